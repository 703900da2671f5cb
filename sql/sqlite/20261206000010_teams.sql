-- Microsoft Teams conversation references, so the bot can post into every Teams thread it
-- serves after a restart or a standby takeover (Bot Framework ConversationReference: service
-- URL, conversation, tenant). A channel thread's conversation id is
-- '<conversation_id>;messageid=<thread root>', and the thread root is the session's thread_id,
-- so one row per channel or chat covers every thread in it.
CREATE TABLE teams_conversations (
    conversation_id    TEXT PRIMARY KEY,            -- channel id '19:…@thread.tacv2', or a chat's id
    conversation_type  TEXT NOT NULL,               -- 'channel' | 'personal' | 'groupChat'
    service_url        TEXT NOT NULL,               -- the activity's serviceUrl, base of the Connector API
    tenant_id          TEXT NOT NULL DEFAULT '',
    team_id            TEXT NOT NULL DEFAULT '',    -- channelData.team.id, '' outside teams
    name               TEXT NOT NULL DEFAULT '',    -- channel or chat name when Teams sent one
    bot_id             TEXT NOT NULL,               -- recipient.id, '28:<app id>'
    updated_at         INTEGER NOT NULL
);

-- Teams users the bot has heard from: display name (for resolve_user) and the conversation
-- where they last addressed the bot (where a session they start from Teams lives).
CREATE TABLE teams_users (
    user_id               TEXT PRIMARY KEY,         -- AAD object id (lowercase), else the '29:' id
    account_id            TEXT NOT NULL,            -- the ChannelAccount id, '29:…'
    name                  TEXT NOT NULL DEFAULT '',
    last_conversation_id  TEXT,                     -- a teams_conversations.conversation_id
    updated_at            INTEGER NOT NULL
);
