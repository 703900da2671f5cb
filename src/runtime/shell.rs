//! Remote shell scripts built so that no value can change their meaning.
//!
//! A [`Script`] is assembled from fixed fragments (`&'static str`, so they can only come from
//! the program text) and values, which are always quoted by `shlex` (POSIX single-quote rules;
//! a NUL byte is refused, as no shell can carry it). The SSH layer runs it in a plain bash
//! started from a login shell (`bash -lc 'exec bash -c "$1"' sm-script <script>`), so the
//! user's login `PATH` applies (non-interactive SSH commands get a minimal one), and quotes
//! that whole command once more for the remote login shell.
//!
//! # A scrubbed environment
//!
//! The login shell reads the VM user's profile, which is where an operator keeps secrets such
//! as `GH_TOKEN`. Every script therefore starts by taking `GH_TOKEN` into a shell variable that
//! is not exported (`sm_gh_token`: only the git credential helper gets it, see
//! [`super::git`]) and removing every exported variable but [`BASE_ENV`] and the names the
//! script keeps on purpose ([`Script::keeping`], e.g. the bare names of `SM_CONTAINER_ENV` for
//! the agent). So `devcontainer up`, git, podman and whatever they start see `PATH`, `HOME`,
//! `USER`, `LANG` and what rootless podman needs, nothing else.
//!
//! Values never go on a command line of the VM when they are secret: the whole script is
//! visible in `ps` there. Secret values reach a remote process on its stdin instead.

use std::fmt;

/// A value that cannot be put into a shell command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot pass {what} to a shell: it contains a NUL byte")]
pub struct QuoteError {
    /// What the value was (e.g. `branch name`), for the message.
    pub what: String,
}

/// Quotes one value for a POSIX shell.
///
/// # Errors
/// [`QuoteError`] when the value contains a NUL byte.
pub fn quote(value: &str) -> Result<String, QuoteError> {
    shlex::try_quote(value)
        .map(|q| q.into_owned())
        .map_err(|_| QuoteError {
            what: "a value".into(),
        })
}

/// The variables every remote command keeps: what programs need to run, and what rootless
/// podman needs to find its runtime directory and user bus.
pub const BASE_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "XDG_RUNTIME_DIR",
    "DBUS_SESSION_BUS_ADDRESS",
];

/// Takes `GH_TOKEN` into an unexported variable, then unsets every exported variable whose
/// name is not in `sm_keep` (a space-separated list set just before). Readonly variables of
/// bash itself cannot be unset and are not secrets.
const SCRUB_ENV: &str = r#"sm_gh_token=${GH_TOKEN:-}
for sm_v in $(compgen -e); do case " $sm_keep " in *" $sm_v "*) ;; *) unset "$sm_v" 2>/dev/null || true ;; esac; done
unset sm_v
export LANG="${LANG:-C.UTF-8}""#;

/// A shell script for the remote login shell.
#[derive(Clone, PartialEq, Eq)]
pub struct Script {
    lines: Vec<String>,
}

impl Default for Script {
    fn default() -> Self {
        Self::new()
    }
}

impl Script {
    /// An empty script that stops at the first failing command (`set -eu`) and runs in the
    /// scrubbed environment (see the module documentation).
    pub fn new() -> Self {
        Self::keeping::<&str>(&[])
    }

    /// Like [`Script::new`], keeping also the exported variables `names` (each a valid
    /// variable name; anything else is ignored).
    pub fn keeping<S: AsRef<str>>(names: &[S]) -> Self {
        let keep: Vec<&str> = BASE_ENV
            .iter()
            .copied()
            .chain(
                names
                    .iter()
                    .map(AsRef::as_ref)
                    .filter(|n| is_variable_name(n)),
            )
            .collect();
        Self {
            lines: vec![
                "set -eu".to_owned(),
                // Names are `[A-Za-z_][A-Za-z0-9_]*`: nothing to quote, but quote anyway.
                format!(
                    "sm_keep={}",
                    shlex::try_quote(&keep.join(" "))
                        .map(|q| q.into_owned())
                        .unwrap_or_default()
                ),
                SCRUB_ENV.to_owned(),
            ],
        }
    }

    /// Appends a fixed fragment, written in the program (never built from input).
    pub fn raw(&mut self, fragment: &'static str) -> &mut Self {
        self.lines.push(fragment.to_owned());
        self
    }

    /// Appends `program arg…` with every word quoted.
    ///
    /// # Errors
    /// [`QuoteError`] naming the argument that cannot be quoted.
    pub fn command<S: AsRef<str>>(
        &mut self,
        program: &str,
        args: &[S],
    ) -> Result<&mut Self, QuoteError> {
        let line = self.words(program, args)?;
        self.lines.push(line);
        Ok(self)
    }

    /// Appends a fixed fragment followed by quoted words, e.g. `raw_then("exec", &[…])` or
    /// `raw_then("cd", &[path])`.
    ///
    /// # Errors
    /// [`QuoteError`].
    pub fn raw_then<S: AsRef<str>>(
        &mut self,
        fragment: &'static str,
        args: &[S],
    ) -> Result<&mut Self, QuoteError> {
        let mut line = fragment.to_owned();
        for arg in args {
            line.push(' ');
            line.push_str(&quote_named(arg.as_ref(), fragment)?);
        }
        self.lines.push(line);
        Ok(self)
    }

    /// Appends `NAME=<quoted value>` (a shell variable, not exported), for fixed fragments to
    /// use as `"$NAME"`. The name is fixed by the program.
    ///
    /// # Errors
    /// [`QuoteError`].
    pub fn set(&mut self, name: &'static str, value: &str) -> Result<&mut Self, QuoteError> {
        let line = format!("{name}={}", quote_named(value, name)?);
        self.lines.push(line);
        Ok(self)
    }

    /// Appends `export NAME=<quoted value>`. The name is fixed by the program.
    ///
    /// # Errors
    /// [`QuoteError`].
    pub fn export(&mut self, name: &'static str, value: &str) -> Result<&mut Self, QuoteError> {
        let line = format!("export {name}={}", quote_named(value, name)?);
        self.lines.push(line);
        Ok(self)
    }

    fn words<S: AsRef<str>>(&self, program: &str, args: &[S]) -> Result<String, QuoteError> {
        let mut line = quote_named(program, "program")?;
        for arg in args {
            line.push(' ');
            line.push_str(&quote_named(arg.as_ref(), program)?);
        }
        Ok(line)
    }

    /// The script text.
    pub fn render(&self) -> String {
        let mut text = self.lines.join("\n");
        text.push('\n');
        text
    }
}

impl fmt::Debug for Script {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

/// Whether `name` is a shell variable name (`[A-Za-z_][A-Za-z0-9_]*`).
pub fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn quote_named(value: &str, what: &str) -> Result<String, QuoteError> {
    shlex::try_quote(value)
        .map(|q| q.into_owned())
        .map_err(|_| QuoteError {
            what: format!("an argument of {what}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a script with the local bash and returns stdout.
    fn run_locally(script: &Script) -> String {
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(script.render())
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn hostile_values_arrive_as_one_literal_word() {
        let dir = tempfile::tempdir().expect("dir");
        let canary = dir.path().join("pwned");
        let canary_s = canary.display().to_string();
        let hostile = [
            format!("x; touch {canary_s}"),
            format!("$(touch {canary_s})"),
            format!("`touch {canary_s}`"),
            format!("'; touch {canary_s}; '"),
            format!("\"; touch {canary_s}; \""),
            format!("a\ntouch {canary_s}"),
            format!("a && touch {canary_s}"),
            format!("a | touch {canary_s}"),
            "$HOME".to_owned(),
            "*".to_owned(),
            "-rf".to_owned(),
            String::new(),
            "ünïcødé 🎉".to_owned(),
        ];
        for value in &hostile {
            let mut script = Script::new();
            script
                .command("printf", &["%s", value.as_str()])
                .expect("quotable");
            assert_eq!(&run_locally(&script), value, "value changed meaning");
            let mut script = Script::new();
            script.export("SM_TEST_VALUE", value).expect("quotable");
            script.raw("printf %s \"$SM_TEST_VALUE\"");
            assert_eq!(&run_locally(&script), value);
        }
        assert!(!canary.exists(), "a value was executed");
    }

    #[test]
    fn the_environment_is_scrubbed_and_the_token_kept_unexported() {
        let mut script = Script::keeping(&["KEEP_ME", "not a name"]);
        script.raw(r#"printf '%s|%s|%s|%s|%s\n' "${GH_TOKEN:-}" "${SECRET_X:-}" "${KEEP_ME:-}" "$sm_gh_token" "${PATH:+path}""#);
        script.raw(r#"bash -c 'printf "%s|%s\n" "${sm_gh_token:-}" "${GH_TOKEN:-}"'"#);
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(script.render())
            .env("GH_TOKEN", "tok")
            .env("SECRET_X", "x")
            .env("KEEP_ME", "kept")
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines();
        assert_eq!(
            lines.next(),
            Some("||kept|tok|path"),
            "only kept names stay exported"
        );
        assert_eq!(
            lines.next(),
            Some("|"),
            "children see neither the token nor its copy"
        );
    }

    #[test]
    fn nul_bytes_are_refused() {
        let mut script = Script::new();
        let err = script.command("echo", &["a\0b"]).expect_err("NUL");
        assert!(err.to_string().contains("NUL"));
        assert!(quote("x\0").is_err());
        assert_eq!(quote("plain").expect("ok"), "plain");
    }

    #[test]
    fn scripts_stop_at_the_first_failure() {
        let mut script = Script::new();
        script.raw("false").raw("echo not-reached");
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(script.render())
            .output()
            .expect("bash");
        assert!(!out.status.success());
        assert!(out.stdout.is_empty());
    }
}
