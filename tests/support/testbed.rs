//! The provisioned test world (`scripts/testbed`): read from its environment file.

use std::collections::HashMap;
use std::path::PathBuf;

/// Values `scripts/testbed` wrote to `<state>/env`.
#[derive(Debug, Clone)]
pub struct Testbed {
    vars: HashMap<String, String>,
}

impl Testbed {
    /// Reads `${SM_TESTBED_DIR:-/var/lib/sm-testbed}/env`; panics with what to do when the
    /// testbed is not provisioned.
    pub fn load() -> Self {
        let dir =
            std::env::var("SM_TESTBED_DIR").unwrap_or_else(|_| "/var/lib/sm-testbed".to_owned());
        let path = PathBuf::from(&dir).join("env");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "the testbed is not provisioned ({}: {e}); run scripts/testbed (scripts/test does)",
                path.display()
            )
        });
        let vars = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| {
                (
                    k.trim().to_owned(),
                    v.trim().trim_matches('"').trim_matches('\'').to_owned(),
                )
            })
            .collect();
        Self { vars }
    }

    /// One value; panics naming it when missing.
    pub fn get(&self, key: &str) -> String {
        self.vars
            .get(key)
            .cloned()
            .unwrap_or_else(|| panic!("{key} missing from the testbed env file"))
    }

    /// `SM_TEST_VM_PORT`.
    pub fn port(&self) -> u16 {
        self.get("SM_TEST_VM_PORT").parse().expect("port")
    }

    /// The known_hosts content for the VM.
    pub fn known_hosts(&self) -> String {
        std::fs::read_to_string(self.get("SM_TEST_VM_KNOWN_HOSTS")).expect("known_hosts")
    }
}
