//! The shipped configs are ones the mirror accepts.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

use pullthrough::config::Config;

#[test]
fn container_config_is_valid() {
    let text = std::fs::read_to_string("examples/mirror.container.toml").unwrap();
    let config = Config::from_toml(&text).unwrap();
    config.validate().unwrap();
    assert_eq!(config.storage.dir.to_str(), Some("/var/lib/pullthrough"));
}

#[test]
fn repository_config_is_valid() {
    let text = std::fs::read_to_string("mirror.toml").unwrap();
    Config::from_toml(&text).unwrap().validate().unwrap();
}
