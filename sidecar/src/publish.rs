//! What an instance asks of service groups (seed 002) at its first join:
//! the groups it joins (`--service-group`) and the ports it publishes in a
//! group of its own (`--publish`), whose internal port defaults to
//! `deployment.port` of `warp.config.js` (seed 004's visibility) or the
//! instance's first port. Without either the instance stays private: no
//! gateway has a path to it.

use std::path::PathBuf;

use meshlib::fsutil::read_text_limited;
use meshlib::services::{parse_publish, GroupName, JoinServices, PortSpec};

use crate::config::{Config, ConfigError};

/// The `--publish` values, parsed (internal ports possibly missing).
fn specs(config: &Config) -> Result<Vec<PortSpec>, ConfigError> {
    config
        .publish
        .iter()
        .map(|p| parse_publish(p).map_err(|m| ConfigError::invalid("publish", m)))
        .collect()
}

/// Checks `service-groups` and `publish` without reading any file: names,
/// syntax, and seed 002's rules (a missing internal port is checked as the
/// external one; the real one is known at join).
pub fn check(config: &Config) -> Result<(), ConfigError> {
    for g in &config.service_groups {
        g.parse::<GroupName>()
            .map_err(|e| ConfigError::invalid("service-groups", e.to_string()))?;
    }
    if config.publish.is_empty() {
        return Ok(());
    }
    meshlib::services::check_ports(&specs(config)?)
        .map_err(|e| ConfigError::invalid("publish", e.to_string()))?;
    Ok(())
}

/// `deployment.port` of the instance's `warp.config.js`, if it sets one.
fn deployment_port(config: &Config) -> Result<Option<u16>, ConfigError> {
    let (path, required) = match &config.warp_config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from("warp.config.js"), false),
    };
    let max = meshlib::ist::config::MAX_WARP_CONFIG_BYTES as u64;
    match read_text_limited(&path, max) {
        Ok(text) => meshlib::ist::config::parse_warp_deployment_port(&text).map_err(|e| {
            ConfigError::WarpConfig {
                path,
                message: e.to_string(),
            }
        }),
        Err(e) if !required && e.is_not_found() => Ok(None),
        Err(e) => Err(ConfigError::WarpConfig {
            path,
            message: e.reason(),
        }),
    }
}

/// The join's service requests. A published port without an internal port
/// gets `deployment.port`, else the first of `ports`; with neither it is an
/// error naming the port.
pub fn join_services(config: &Config) -> Result<JoinServices, ConfigError> {
    let groups = config
        .service_groups
        .iter()
        .map(|g| g.parse())
        .collect::<Result<Vec<GroupName>, _>>()
        .map_err(|e| ConfigError::invalid("service-groups", e.to_string()))?;
    let mut specs = specs(config)?;
    if specs.iter().any(|s| s.destination_port.is_none()) {
        let internal = deployment_port(config)?.or_else(|| config.ports.first().copied());
        for s in &mut specs {
            if s.destination_port.is_none() {
                let port = internal.ok_or_else(|| {
                    ConfigError::invalid(
                        "publish",
                        format!(
                            "port {}: no internal port: give EXT:INT, deployment.port in warp.config.js, or --port",
                            s.port
                        ),
                    )
                })?;
                s.destination_port = Some(i64::from(port));
            }
        }
    }
    let publish = if specs.is_empty() {
        vec![]
    } else {
        meshlib::services::check_ports(&specs)
            .map_err(|e| ConfigError::invalid("publish", e.to_string()))?
    };
    Ok(JoinServices { groups, publish })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_flags_deployment_port_and_rules() {
        let dir = tempfile::tempdir().unwrap();
        let js = dir.path().join("warp.config.js");
        std::fs::write(&js, "module.exports = { deployment: { port: 65500 } };").unwrap();
        let mut c = Config {
            publish: vec!["443/http+tls".into(), "10000:5432/tls".into()],
            service_groups: vec!["web".into()],
            warp_config: Some(js),
            ..Config::default()
        };
        check(&c).unwrap();
        let s = join_services(&c).unwrap();
        assert_eq!(s.groups[0].as_str(), "web");
        let ports: Vec<(u16, u16)> = s
            .publish
            .iter()
            .map(|p| (p.port, p.destination_port))
            .collect();
        assert_eq!(
            ports,
            [(443, 65500), (10000, 5432)],
            "deployment.port fills the missing internal port only"
        );
        // Without warp.config.js: the first declared port.
        c.warp_config = None;
        c.ports = vec![8080];
        assert_eq!(join_services(&c).unwrap().publish[0].destination_port, 8080);
        c.ports.clear();
        let e = join_services(&c).unwrap_err().to_string();
        assert!(
            e.contains("port 443") && e.contains("no internal port"),
            "{e}"
        );
        // Seed 002's rules are checked before any token is used.
        c.publish = vec!["8080:80/http".into()];
        let e = check(&c).unwrap_err().to_string();
        assert!(e.starts_with("publish: port 8080:"), "{e}");
        c.publish.clear();
        c.service_groups = vec!["Bad Name".into()];
        assert!(check(&c)
            .unwrap_err()
            .to_string()
            .starts_with("service-groups"));
        // Private by default: nothing asked.
        let none = join_services(&Config::default()).unwrap();
        assert!(none.groups.is_empty() && none.publish.is_empty());
    }
}
