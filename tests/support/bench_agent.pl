# The benchmark's load agent: a stand-in for the Claude Code CLI that speaks its stream-json
# exactly (see shared/reference/claude-code.md) and answers at once, so a load measures the
# bot rather than a model. It runs in the sandbox containers (perl with core modules only: the
# image has no python3 or node), started through SM_CLAUDE_COMMAND; tests/bench.rs passes it as
# `perl -MMIME::Base64 -e 'eval decode_base64(...)' --` and the bot appends the CLI's flags
# (-p, --input-format, --session-id/--resume ID, --append-system-prompt …), which it accepts.
#
# stdin: control requests (`initialize` and any other are answered with success) and user
# turns. Each turn gets a `system/init`, assistant messages (with usage, as the CLI sends
# them) and a `result` with usage. What a turn says depends on the user's text:
#   bench echo ID                      -> "echo ID recv=NS sent=NS"
#   bench stream ID CHUNKS SIZE MS     -> CHUNKS assistant messages, one line of SIZE chars each
#                                         ("ID cK " then filler), MS ms apart, then
#                                         "done ID recv=NS sent=NS"
#   bench request DOMAIN               -> a line and "[NETWORK_REQUEST: DOMAIN]"
#   [NETWORK_APPROVED: DOMAIN] ...     -> "approved DOMAIN recv=NS sent=NS"
#   [NETWORK_DENIED: DOMAIN] ...       -> "denied DOMAIN recv=NS sent=NS"
#   anything else                      -> "ok"
# recv is when the line was read, sent when the answer was written (Unix nanoseconds).
use strict;
use warnings;
use JSON::PP;
use Time::HiRes qw(time sleep);

$| = 1;
my $json = JSON::PP->new->utf8;
my $session = 'bench-session';
for my $i (0 .. $#ARGV - 1) {
    $session = $ARGV[$i + 1] if $ARGV[$i] eq '--session-id' || $ARGV[$i] eq '--resume';
}
my $messages = 0;
my $started = time();

sub now_ns { return sprintf('%.0f', time() * 1e9); }

sub emit { print $json->encode($_[0]), "\n"; }

sub usage {
    return { input_tokens => 12, cache_creation_input_tokens => 0,
             cache_read_input_tokens => 100, output_tokens => $_[0] };
}

sub assistant {
    my ($text) = @_;
    $messages++;
    emit({ type => 'assistant',
           message => { id => "msg_bench_$messages", type => 'message', role => 'assistant',
                        model => 'bench-agent', content => [{ type => 'text', text => $text }],
                        stop_reason => undef, stop_sequence => undef,
                        usage => usage(int(length($text) / 4) + 1) },
           parent_tool_use_id => undef, session_id => $session,
           uuid => sprintf('00000000-0000-4000-8000-%012d', $messages) });
}

sub result {
    my ($text, $turn_start) = @_;
    my $ms = int((time() - $turn_start) * 1000);
    emit({ type => 'result', subtype => 'success', is_error => JSON::PP::false, num_turns => 1,
           result => $text, session_id => $session, total_cost_usd => 0, duration_ms => $ms,
           duration_api_ms => $ms, stop_reason => 'end_turn', usage => usage(5),
           modelUsage => { 'bench-agent' => { contextWindow => 200000, costUSD => 0 } } });
}

# One line of a streamed answer: exactly $size characters, newline excluded.
sub chunk_line {
    my ($id, $k, $size) = @_;
    my $line = "$id c$k ";
    my $filler = 'lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod ';
    $line .= $filler while length($line) < $size;
    $line = substr($line, 0, $size);
    $line =~ s/ $/x/;
    return "$line\n";
}

while (my $line = <STDIN>) {
    my $recv = now_ns();
    my $turn_start = time();
    my $msg = eval { $json->decode($line) };
    next unless ref $msg eq 'HASH';
    my $type = $msg->{type} // '';
    if ($type eq 'control_request') {
        my $subtype = (ref $msg->{request} eq 'HASH' ? $msg->{request}{subtype} : '') // '';
        my $answer = $subtype eq 'initialize'
            ? { commands => [], models => [], output_style => 'default' } : {};
        emit({ type => 'control_response',
               response => { subtype => 'success', request_id => $msg->{request_id},
                             response => $answer } });
        next;
    }
    next unless $type eq 'user';
    my $content = ref $msg->{message} eq 'HASH' ? $msg->{message}{content} : '';
    my $text = ref $content eq 'ARRAY'
        ? join('', map { ref $_ eq 'HASH' && ($_->{type} // '') eq 'text' ? $_->{text} : '' } @$content)
        : ($content // '');
    emit({ type => 'system', subtype => 'init', session_id => $session, cwd => '/workspace',
           tools => [], model => 'bench-agent', permissionMode => 'bypassPermissions',
           slash_commands => [], claude_code_version => 'bench' });
    if ($text =~ /bench echo (\S+)/) {
        my $id = $1;
        assistant("echo $id recv=$recv sent=" . now_ns() . "\n");
        result('echoed', $turn_start);
    } elsif ($text =~ /bench stream (\S+) (\d+) (\d+) (\d+)/) {
        my ($id, $chunks, $size, $ms) = ($1, $2, $3, $4);
        for my $k (0 .. $chunks - 1) {
            assistant(chunk_line($id, $k, $size));
            sleep($ms / 1000) if $ms > 0;
        }
        assistant("done $id recv=$recv sent=" . now_ns() . "\n");
        result('streamed', $turn_start);
    } elsif ($text =~ /bench request (\S+)/) {
        assistant("I need $1 for this.\n[NETWORK_REQUEST: $1]\n");
        result('asked', $turn_start);
    } elsif ($text =~ /\[NETWORK_(APPROVED|DENIED): ([^\]\s]+)\]/) {
        my $word = $1 eq 'APPROVED' ? 'approved' : 'denied';
        assistant("$word $2 recv=$recv sent=" . now_ns() . "\n");
        result($word, $turn_start);
    } else {
        assistant("ok\n");
        result('ok', $turn_start);
    }
}
