//! Profiles: named sets of session settings an operator offers (`SM_PROFILES_FILE`).
//!
//! The file is TOML (parsed with the `toml` crate), one table per profile under `profile`:
//!
//! ```toml
//! [profile.default]            # applies when `start` names no profile
//! permission_mode = "acceptEdits"
//! budget_usd = 5
//!
//! [profile.review]
//! description = "Read-only review"
//! model = "claude-sonnet-4-5"                  # the CLI's --model
//! permission_mode = "plan"                     # default | acceptEdits | plan | bypassPermissions
//! allowed_tools = ["Read", "Bash(git diff:*)"] # --allowedTools: used without asking
//! denied_tools = ["Bash(curl:*)", "WebFetch"]  # --disallowedTools: never used, never asked
//! budget_usd = 2.5                             # this session's cap, instead of SM_SESSION_BUDGET_USD
//! idle_secs = 1800                             # instead of SM_SESSION_IDLE_SECS (0 = never)
//! container_image = "ghcr.io/acme/dev:1"       # the generated (fallback) devcontainer's image
//! container_env = ["GITHUB_TOKEN"]             # more names passed from the VM, like SM_CONTAINER_ENV
//! users = ["alice", "bob"]                     # who may pick it (ids or usernames; admins always may)
//! ```
//!
//! Every key is optional; what a profile leaves out comes from the bot's settings. The
//! `default` profile applies to every session started without `--profile=name`, so it cannot
//! name `users`. [`Profiles::parse`] reports every problem of a file at once (unknown keys and
//! sections, wrong types, bad values), each naming the profile and the key; the configuration
//! check refuses the file with all of them listed, like any other setting.
//!
//! A session keeps the profile it was started with: the whole profile is recorded with the
//! session ([`crate::store::Session::profile`]), so a restart of the bot, or a changed file,
//! never changes what a running session may do.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::access::{Access, Roles};
use crate::config::EnvEntry;
use crate::permission::PermissionMode;

/// The profile that applies when a start names none.
pub const DEFAULT_PROFILE: &str = "default";

/// Longest profile name, in characters.
pub const MAX_NAME_LEN: usize = 64;

/// Longest tool rule (an entry of `allowed_tools` / `denied_tools`), in characters.
const MAX_TOOL_RULE_LEN: usize = 200;

/// One profile: what a session started with it runs with. `None` and empty lists mean the
/// bot's own settings.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Profile {
    /// Its name (`[profile.<name>]`).
    pub name: String,
    /// A line for `profile` listings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The CLI's `--model` (an alias such as `sonnet` or a full model name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The permission mode a session starts in (`!mode` can still switch it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permission_mode: Option<PermissionMode>,
    /// Tool rules used without asking (`--allowedTools`), e.g. `Bash(git diff:*)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_tools: Vec<String>,
    /// Tool rules never used (`--disallowedTools`): the CLI refuses them itself, so no
    /// permission card ever asks for them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub denied_tools: Vec<String>,
    /// The session's own spending cap in US dollars, instead of `SM_SESSION_BUDGET_USD`
    /// (0 = none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_usd: Option<f64>,
    /// Seconds without a message before the session hibernates, instead of
    /// `SM_SESSION_IDLE_SECS` (0 = never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_secs: Option<u64>,
    /// Image of the generated devcontainer (repositories without a usable configuration of
    /// their own), instead of `SM_CONTAINER_IMAGE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_image: Option<String>,
    /// Variable names passed from the VM's environment into the agent's, besides
    /// `SM_CONTAINER_ENV`'s.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub container_env: Vec<String>,
    /// Who may pick it, as written (user ids or usernames, resolved at start); empty:
    /// everyone who may use the bot. Admins may pick every profile.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
}

impl Profile {
    /// The agent's command-line words this profile adds: `--model <m>`,
    /// `--allowedTools <rule>…`, `--disallowedTools <rule>…` (each rule its own word; the
    /// CLI's tool options take several values).
    pub fn agent_args(&self) -> Vec<String> {
        let mut words = Vec::new();
        if let Some(model) = &self.model {
            words.push("--model".to_owned());
            words.push(model.clone());
        }
        for (flag, rules) in [
            ("--allowedTools", &self.allowed_tools),
            ("--disallowedTools", &self.denied_tools),
        ] {
            if !rules.is_empty() {
                words.push(flag.to_owned());
                words.extend(rules.iter().cloned());
            }
        }
        words
    }

    /// The hibernation idle time: the profile's, else `base` (`SM_SESSION_IDLE_SECS`).
    pub fn idle(&self, base: Duration) -> Duration {
        self.idle_secs.map_or(base, Duration::from_secs)
    }

    /// The session's own budget step in dollars: the profile's (`Some(0)` means none), else
    /// `base` (`SM_SESSION_BUDGET_USD`).
    pub fn session_budget(&self, base: Option<f64>) -> Option<f64> {
        match self.budget_usd {
            Some(d) => (d > 0.0).then_some(d),
            None => base,
        }
    }

    /// Markdown lines describing what the profile sets (for `!profile`).
    pub fn describe(&self) -> String {
        let mut lines = vec![format!("**Profile `{}`**", self.name)];
        if let Some(d) = &self.description {
            lines.push(d.clone());
        }
        let list = |rules: &[String]| {
            rules
                .iter()
                .map(|r| format!("`{}`", r.replace('`', "'")))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut set = Vec::new();
        if let Some(m) = &self.model {
            set.push(format!("- model: `{m}`"));
        }
        if let Some(m) = self.permission_mode {
            set.push(format!("- permission mode at start: `{m}`"));
        }
        if !self.allowed_tools.is_empty() {
            set.push(format!(
                "- allowed without asking: {}",
                list(&self.allowed_tools)
            ));
        }
        if !self.denied_tools.is_empty() {
            set.push(format!("- denied: {}", list(&self.denied_tools)));
        }
        if let Some(b) = self.budget_usd {
            set.push(if b > 0.0 {
                format!("- budget: ${b:.2}")
            } else {
                "- budget: none".to_owned()
            });
        }
        if let Some(s) = self.idle_secs {
            set.push(if s > 0 {
                format!(
                    "- hibernates after {} idle",
                    crate::dispatch::human_duration(
                        i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX)
                    )
                )
            } else {
                "- never hibernates".to_owned()
            });
        }
        if let Some(i) = &self.container_image {
            set.push(format!("- fallback container image: `{i}`"));
        }
        if !self.container_env.is_empty() {
            set.push(format!(
                "- extra environment: {}",
                list(&self.container_env)
            ));
        }
        if set.is_empty() {
            set.push("- (sets nothing: the bot's settings apply)".to_owned());
        }
        lines.extend(set);
        lines.join("\n")
    }
}

/// The profiles of `SM_PROFILES_FILE`, by name; empty when no file is configured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Profiles {
    by_name: BTreeMap<String, Profile>,
}

impl Profiles {
    /// Reads and checks a profiles file (see the module documentation).
    ///
    /// # Errors
    /// Every problem found, each a sentence naming the profile and key (or the file, when
    /// it cannot be read or is not TOML).
    pub fn load(path: &Path) -> Result<Self, Vec<String>> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| vec![format!("cannot read {}: {e}", path.display())])?;
        Self::parse(&text)
    }

    /// Parses and checks the text of a profiles file.
    ///
    /// # Errors
    /// Every problem found (see [`Profiles::load`]).
    pub fn parse(text: &str) -> Result<Self, Vec<String>> {
        let table: toml::Table = toml::from_str(text).map_err(|e| {
            vec![format!(
                "not valid TOML: {}",
                e.to_string()
                    .lines()
                    .next()
                    .unwrap_or("a syntax error")
                    .trim()
            )]
        })?;
        let mut problems = Vec::new();
        let mut by_name = BTreeMap::new();
        for (key, value) in &table {
            if key != "profile" {
                problems.push(format!(
                    "unknown section `{key}`: profiles are written as [profile.<name>]"
                ));
                continue;
            }
            let Some(profiles) = value.as_table() else {
                problems.push("`profile` must be a table of profiles: [profile.<name>]".into());
                continue;
            };
            for (name, body) in profiles {
                match Self::profile(name, body) {
                    Ok(profile) => {
                        by_name.insert(name.clone(), profile);
                    }
                    Err(mut found) => problems.append(&mut found),
                }
            }
        }
        if problems.is_empty() && by_name.is_empty() {
            problems.push("defines no profile: add at least one [profile.<name>] table".into());
        }
        if problems.is_empty() {
            Ok(Self { by_name })
        } else {
            Err(problems)
        }
    }

    /// One `[profile.<name>]` table, checked key by key.
    fn profile(name: &str, body: &toml::Value) -> Result<Profile, Vec<String>> {
        let mut problems = Vec::new();
        let at = |key: &str| format!("[profile.{name}] {key}");
        if let Err(reason) = check_name(name) {
            problems.push(format!("[profile.{name}]: the name {reason}"));
        }
        let Some(body) = body.as_table() else {
            problems.push(format!("[profile.{name}] must be a table of settings"));
            return Err(problems);
        };
        let mut profile = Profile {
            name: name.to_owned(),
            ..Profile::default()
        };
        for (key, value) in body {
            let checked = match key.as_str() {
                "description" => text(value, 200).map(|v| profile.description = Some(v)),
                "model" => model(value).map(|v| profile.model = Some(v)),
                "permission_mode" => permission_mode(value).map(|v| profile.permission_mode = Some(v)),
                "allowed_tools" => tool_rules(value).map(|v| profile.allowed_tools = v),
                "denied_tools" => tool_rules(value).map(|v| profile.denied_tools = v),
                "budget_usd" => dollars(value).map(|v| profile.budget_usd = Some(v)),
                "idle_secs" => seconds(value).map(|v| profile.idle_secs = Some(v)),
                "container_image" => image(value).map(|v| profile.container_image = Some(v)),
                "container_env" => env_names(value).map(|v| profile.container_env = v),
                "users" => users(value).map(|v| profile.users = v),
                other => Err(format!(
                    "is not a profile setting (known: description, model, permission_mode, allowed_tools, denied_tools, budget_usd, idle_secs, container_image, container_env, users){}",
                    if other.contains('-') { "; keys use underscores" } else { "" }
                )),
            };
            if let Err(reason) = checked {
                problems.push(format!("{}: {reason}", at(key)));
            }
        }
        if name == DEFAULT_PROFILE && !profile.users.is_empty() {
            problems.push(format!(
                "{}: the `default` profile applies to everyone who names no profile, so it cannot be limited to some users",
                at("users")
            ));
        }
        if problems.is_empty() {
            Ok(profile)
        } else {
            Err(problems)
        }
    }

    /// The profile called `name`.
    pub fn get(&self, name: &str) -> Option<&Profile> {
        self.by_name.get(name)
    }

    /// Every profile, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Profile> {
        self.by_name.values()
    }

    /// Whether no profile is defined (no `SM_PROFILES_FILE`).
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// Why a profile cannot be used for a start.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PickError {
    /// `--profile=` was given but no profiles file is configured.
    #[error("no profiles are configured here (SM_PROFILES_FILE), so `--profile` cannot be used")]
    NoProfiles,
    /// No profile has that name.
    #[error("there is no profile `{name}`; {}", choices_text(.choices))]
    Unknown {
        /// The name asked for.
        name: String,
        /// The profiles the asker may pick.
        choices: Vec<String>,
    },
    /// The profile exists but the asker may not pick it.
    #[error("you may not use the profile `{name}` (ask an administrator); {}", choices_text(.choices))]
    NotYours {
        /// The name asked for.
        name: String,
        /// The profiles the asker may pick.
        choices: Vec<String>,
    },
}

fn choices_text(choices: &[String]) -> String {
    if choices.is_empty() {
        "you may not pick any profile".to_owned()
    } else {
        format!(
            "profiles you may pick: {}",
            choices
                .iter()
                .map(|c| format!("`{c}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// The profiles with who may pick each, resolved to user ids at start. Cheap to share in an
/// `Arc`.
#[derive(Debug, Clone, Default)]
pub struct ProfileBook {
    profiles: Profiles,
    /// Per profile name, who may pick it (absent: everyone).
    pickers: HashMap<String, Access>,
}

impl ProfileBook {
    /// The profiles, each limited to the user ids in `pickers` (a profile without an entry
    /// is open to everyone who may use the bot).
    pub fn new(profiles: Profiles, pickers: HashMap<String, Access>) -> Self {
        Self { profiles, pickers }
    }

    /// The profiles.
    pub fn profiles(&self) -> &Profiles {
        &self.profiles
    }

    /// Whether `user_id` may pick `profile`: admins always, others when it names no users
    /// or names them.
    pub fn may_pick(&self, roles: &Roles, user_id: &str, profile: &Profile) -> bool {
        roles.is_admin(user_id)
            || self
                .pickers
                .get(&profile.name)
                .is_none_or(|access| access.allows(user_id))
    }

    /// The names of the profiles `user_id` may pick.
    pub fn choices(&self, roles: &Roles, user_id: &str) -> Vec<String> {
        self.profiles
            .iter()
            .filter(|p| self.may_pick(roles, user_id, p))
            .map(|p| p.name.clone())
            .collect()
    }

    /// The profile a start by `user_id` runs with: the one named (which they must be allowed
    /// to pick), else `default` when the file defines it, else none.
    ///
    /// # Errors
    /// [`PickError`] when the named profile does not exist or is not theirs to pick.
    pub fn pick(
        &self,
        roles: &Roles,
        user_id: &str,
        requested: Option<&str>,
    ) -> Result<Option<Profile>, PickError> {
        let Some(name) = requested else {
            return Ok(self.profiles.get(DEFAULT_PROFILE).cloned());
        };
        if self.profiles.is_empty() {
            return Err(PickError::NoProfiles);
        }
        let choices = || self.choices(roles, user_id);
        match self.profiles.get(name) {
            None => Err(PickError::Unknown {
                name: name.to_owned(),
                choices: choices(),
            }),
            Some(p) if !self.may_pick(roles, user_id, p) => Err(PickError::NotYours {
                name: name.to_owned(),
                choices: choices(),
            }),
            Some(p) => Ok(Some(p.clone())),
        }
    }
}

/// A profile name: 1–64 ASCII letters, digits, `_` and `-`, not starting with `-`.
///
/// # Errors
/// What is wrong, as a phrase ("is empty", …).
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name.chars().count() > MAX_NAME_LEN {
        return Err(format!("is longer than {MAX_NAME_LEN} characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
    {
        return Err("may use only letters, digits, `_` and `-`".into());
    }
    if name.starts_with('-') {
        return Err("must not start with `-`".into());
    }
    Ok(())
}

// Value checks: each takes a TOML value and says what is expected when it refuses it.

fn kind(value: &toml::Value) -> &'static str {
    value.type_str()
}

fn string(value: &toml::Value) -> Result<&str, String> {
    value
        .as_str()
        .ok_or_else(|| format!("expected a string, got a {}", kind(value)))
}

fn text(value: &toml::Value, max: usize) -> Result<String, String> {
    let s = string(value)?;
    if s.chars().count() > max || s.chars().any(char::is_control) {
        return Err(format!("expected one line of at most {max} characters"));
    }
    Ok(s.to_owned())
}

fn model(value: &toml::Value) -> Result<String, String> {
    let s = string(value)?;
    let ok = !s.is_empty()
        && s.len() <= 100
        && !s.starts_with('-')
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '@' | '[' | ']')
        });
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "expected a model name or alias such as \"sonnet\" or \"claude-sonnet-4-5\", got {s:?}"
        ))
    }
}

fn permission_mode(value: &toml::Value) -> Result<PermissionMode, String> {
    let s = string(value)?;
    s.parse()
        .map_err(|_| format!("expected default, acceptEdits, plan or bypassPermissions, got {s:?}"))
}

fn strings(value: &toml::Value) -> Result<Vec<&str>, String> {
    let array = value
        .as_array()
        .ok_or_else(|| format!("expected a list of strings, got a {}", kind(value)))?;
    array
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| format!("expected a list of strings, but it holds a {}", kind(v)))
        })
        .collect()
}

fn tool_rules(value: &toml::Value) -> Result<Vec<String>, String> {
    let rules = strings(value)?;
    let mut out = Vec::new();
    for rule in rules {
        let rule = rule.trim();
        let starts_well = rule.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
        if !starts_well
            || rule.chars().count() > MAX_TOOL_RULE_LEN
            || rule.chars().any(char::is_control)
        {
            return Err(format!(
                "expected tool rules such as \"Bash\", \"WebFetch\" or \"Bash(git diff:*)\" (starting with a letter, one line, at most {MAX_TOOL_RULE_LEN} characters), got {rule:?}"
            ));
        }
        out.push(rule.to_owned());
    }
    Ok(out)
}

fn dollars(value: &toml::Value) -> Result<f64, String> {
    let amount = match value {
        toml::Value::Integer(i) => *i as f64,
        toml::Value::Float(f) => *f,
        other => {
            return Err(format!(
                "expected an amount in US dollars, got a {}",
                kind(other)
            ))
        }
    };
    if amount.is_finite() && (0.0..=100_000.0).contains(&amount) {
        Ok(amount)
    } else {
        Err(format!(
            "expected an amount in US dollars between 0 and 100000 (0 = no cap), got {amount}"
        ))
    }
}

fn seconds(value: &toml::Value) -> Result<u64, String> {
    match value.as_integer() {
        Some(s) if (0..=31_536_000).contains(&s) => Ok(s.unsigned_abs()),
        Some(s) => Err(format!(
            "expected a whole number of seconds between 0 (never) and 31536000, got {s}"
        )),
        None => Err(format!(
            "expected a whole number of seconds, got a {}",
            kind(value)
        )),
    }
}

fn image(value: &toml::Value) -> Result<String, String> {
    let s = string(value)?;
    if s.is_empty() || s.starts_with('-') || s.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        Err(format!(
            "expected an image reference such as \"ghcr.io/acme/dev:1\", got {s:?}"
        ))
    } else {
        Ok(s.to_owned())
    }
}

fn env_names(value: &toml::Value) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for entry in strings(value)? {
        match EnvEntry::parse(entry.trim()) {
            Ok(EnvEntry::FromVm(name)) => out.push(name),
            Ok(EnvEntry::Set(name, _)) => {
                return Err(format!(
                    "lists variable names only (their values come from the VM's environment), but {name:?} has a value: keep secrets out of this file"
                ))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

fn users(value: &toml::Value) -> Result<Vec<String>, String> {
    let entries = strings(value)?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.trim().trim_start_matches('@');
        if entry.is_empty() || entry.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("expected user ids or usernames, got {entry:?}"));
        }
        out.push(entry.to_owned());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[profile.default]
permission_mode = "acceptEdits"
budget_usd = 5

[profile.review]
description = "Read-only review"
model = "claude-sonnet-4-5"
permission_mode = "plan"
allowed_tools = ["Read", "Bash(git diff:*)"]
denied_tools = ["WebFetch", "Bash(curl:*)"]
budget_usd = 2.5
idle_secs = 1800
container_image = "ghcr.io/acme/dev:1"
container_env = ["GITHUB_TOKEN"]
users = ["@alice", "bob"]
"#;

    #[test]
    fn a_good_file_gives_every_setting() {
        let profiles = Profiles::parse(GOOD).expect("valid");
        let review = profiles.get("review").expect("review");
        assert_eq!(review.model.as_deref(), Some("claude-sonnet-4-5"));
        assert_eq!(review.permission_mode, Some(PermissionMode::Plan));
        assert_eq!(review.allowed_tools, ["Read", "Bash(git diff:*)"]);
        assert_eq!(review.denied_tools, ["WebFetch", "Bash(curl:*)"]);
        assert_eq!(review.budget_usd, Some(2.5));
        assert_eq!(review.idle_secs, Some(1800));
        assert_eq!(
            review.container_image.as_deref(),
            Some("ghcr.io/acme/dev:1")
        );
        assert_eq!(review.container_env, ["GITHUB_TOKEN"]);
        assert_eq!(review.users, ["alice", "bob"]);
        assert_eq!(
            review.agent_args(),
            [
                "--model",
                "claude-sonnet-4-5",
                "--allowedTools",
                "Read",
                "Bash(git diff:*)",
                "--disallowedTools",
                "WebFetch",
                "Bash(curl:*)"
            ]
        );
        assert_eq!(
            review.idle(Duration::from_secs(7)),
            Duration::from_secs(1800)
        );
        assert_eq!(review.session_budget(Some(9.0)), Some(2.5));
        let default = profiles.get(DEFAULT_PROFILE).expect("default");
        assert_eq!(default.budget_usd, Some(5.0));
        assert!(default.agent_args().is_empty());
        assert_eq!(default.idle(Duration::from_secs(7)), Duration::from_secs(7));
    }

    #[test]
    fn every_problem_of_a_bad_file_is_listed() {
        let bad = r#"
[profile.ok]
model = "sonnet"

[profile.broken]
model = "sonnet; rm -rf /"
permission_mode = "yolo"
denied_tools = "Bash"
budget_usd = -1
idle-secs = 5
container_env = ["GITHUB_TOKEN=ghp_secret"]

[profile."bad name"]

[profile.default]
users = ["alice"]

[profiles.typo]
"#;
        let problems = Profiles::parse(bad).expect_err("invalid");
        let all = problems.join("\n");
        for needle in [
            "[profile.broken] model",
            "[profile.broken] permission_mode",
            "[profile.broken] denied_tools: expected a list",
            "[profile.broken] budget_usd",
            "[profile.broken] idle-secs: is not a profile setting",
            "keys use underscores",
            "[profile.broken] container_env",
            "[profile.bad name]: the name",
            "[profile.default] users",
            "unknown section `profiles`",
        ] {
            assert!(all.contains(needle), "{needle:?} missing from:\n{all}");
        }
        assert_eq!(problems.len(), 9, "{all}");
        assert!(
            !all.contains("ghp_secret"),
            "a secret is never repeated: {all}"
        );
    }

    #[test]
    fn syntax_errors_and_empty_files_are_refused() {
        let syntax = Profiles::parse("[profile.x\nmodel = 1").expect_err("syntax");
        assert!(syntax[0].starts_with("not valid TOML"), "{syntax:?}");
        let empty = Profiles::parse("").expect_err("empty");
        assert!(empty[0].contains("defines no profile"), "{empty:?}");
    }

    #[test]
    fn picking_follows_the_users_and_the_default() {
        let profiles = Profiles::parse(GOOD).expect("valid");
        let roles = Roles {
            users: Access::Everyone,
            admins: ["root-id".to_owned()].into(),
        };
        let book = ProfileBook::new(
            profiles,
            [(
                "review".to_owned(),
                Access::Only(["alice-id".to_owned()].into()),
            )]
            .into(),
        );
        assert_eq!(
            book.pick(&roles, "carol-id", None).unwrap().map(|p| p.name),
            Some("default".to_owned())
        );
        assert_eq!(
            book.pick(&roles, "alice-id", Some("review"))
                .unwrap()
                .map(|p| p.name),
            Some("review".to_owned())
        );
        assert_eq!(
            book.pick(&roles, "root-id", Some("review"))
                .unwrap()
                .map(|p| p.name),
            Some("review".to_owned()),
            "admins may pick every profile"
        );
        let refused = book.pick(&roles, "carol-id", Some("review")).unwrap_err();
        assert_eq!(
            refused,
            PickError::NotYours {
                name: "review".into(),
                choices: vec!["default".into()]
            }
        );
        assert!(refused
            .to_string()
            .contains("profiles you may pick: `default`"));
        assert!(matches!(
            book.pick(&roles, "alice-id", Some("nope")),
            Err(PickError::Unknown { .. })
        ));
        let none = ProfileBook::default();
        assert_eq!(none.pick(&roles, "alice-id", None), Ok(None));
        assert_eq!(
            none.pick(&roles, "alice-id", Some("review")),
            Err(PickError::NoProfiles)
        );
    }

    #[test]
    fn a_recorded_profile_reads_back_the_same() {
        let profiles = Profiles::parse(GOOD).expect("valid");
        let review = profiles.get("review").expect("review");
        let json = serde_json::to_string(review).expect("serialize");
        let back: Profile = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(&back, review);
    }
}
