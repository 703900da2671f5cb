//! Remote shell scripts built so that no value can change their meaning.
//!
//! A [`Script`] is assembled from fixed fragments (`&'static str`, so they can only come from
//! the program text) and values, which are always quoted by `shlex` (POSIX single-quote rules;
//! a NUL byte is refused, as no shell can carry it). The script then runs as
//! `bash -lc <script>` so the user's login `PATH` applies (non-interactive SSH commands get a
//! minimal one), and the SSH layer quotes that whole argument once more for the remote login
//! shell.

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

/// A shell script for the remote login shell.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Script {
    lines: Vec<String>,
}

impl Script {
    /// An empty script that stops at the first failing command (`set -eu`).
    pub fn new() -> Self {
        Self {
            lines: vec!["set -eu".to_owned()],
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
