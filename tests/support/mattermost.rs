//! A faithful fake Mattermost server for tests (being written).
