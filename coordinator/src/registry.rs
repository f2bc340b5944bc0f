//! The participant registry: participant name -> endpoint. The coordinator only ever
//! dials endpoints from here, never an address taken from a client request.
//!
//! Entries come from configuration (fixed: an Enlist cannot re-point them), from a
//! participant's own Enlist (updated when it comes back on a new address), and from the
//! log on recovery (so phase 2 reaches participants that registered themselves).

use std::collections::BTreeMap;
use std::sync::RwLock;

/// Where an entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Config,
    Enlist,
    Log,
}

impl Source {
    pub fn as_str(&self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Enlist => "enlist",
            Source::Log => "log",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub endpoint: String,
    pub source: Source,
}

#[derive(Debug, Default)]
pub struct Registry {
    entries: RwLock<BTreeMap<String, Entry>>,
}

/// Participant names: 1 to 64 characters of `[A-Za-z0-9._-]`.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "participant name {:?} must be 1 to 64 characters of A-Z a-z 0-9 . _ -",
            name.chars().take(80).collect::<String>()
        ))
    }
}

/// Endpoints: `http://host:port` or `https://host:port`, at most 256 characters.
pub fn validate_endpoint(endpoint: &str) -> Result<(), String> {
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"));
    let ok = endpoint.len() <= 256
        && rest.is_some_and(|r| {
            !r.is_empty()
                && r.rsplit_once(':').is_some_and(|(host, port)| {
                    !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
                })
                && !r.contains('/')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "endpoint {:?} must look like http://host:port",
            endpoint.chars().take(80).collect::<String>()
        ))
    }
}

impl Registry {
    pub fn with_config(
        entries: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, String> {
        let registry = Self::default();
        {
            let mut map = registry.entries.write().unwrap_or_else(|p| p.into_inner());
            for (name, endpoint) in entries {
                validate_name(&name)?;
                validate_endpoint(&endpoint)?;
                map.insert(
                    name,
                    Entry {
                        endpoint,
                        source: Source::Config,
                    },
                );
            }
        }
        Ok(registry)
    }

    pub fn endpoint(&self, name: &str) -> Option<String> {
        self.entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .map(|e| e.endpoint.clone())
    }

    /// A participant registering itself. Names fixed by configuration keep their endpoint.
    pub fn register(&self, name: &str, endpoint: &str) -> Result<(), String> {
        validate_name(name)?;
        validate_endpoint(endpoint)?;
        let mut map = self.entries.write().unwrap_or_else(|p| p.into_inner());
        match map.get(name) {
            Some(Entry {
                source: Source::Config,
                endpoint: fixed,
            }) if fixed != endpoint => Err(format!(
                "participant {name} is configured at {fixed}; it cannot be re-pointed to {endpoint}"
            )),
            Some(Entry {
                source: Source::Config,
                ..
            }) => Ok(()),
            _ => {
                map.insert(
                    name.to_string(),
                    Entry {
                        endpoint: endpoint.to_string(),
                        source: Source::Enlist,
                    },
                );
                Ok(())
            }
        }
    }

    /// An endpoint found in the log on recovery; never overrides a known entry.
    pub fn learn(&self, name: &str, endpoint: &str) {
        if validate_name(name).is_err() || validate_endpoint(endpoint).is_err() {
            return;
        }
        self.entries
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_string())
            .or_insert(Entry {
                endpoint: endpoint.to_string(),
                source: Source::Log,
            });
    }

    pub fn list(&self) -> Vec<(String, Entry)> {
        self.entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_names_cannot_be_repointed_and_bad_input_is_refused() {
        let r =
            Registry::with_config([("a".to_string(), "http://127.0.0.1:1".to_string())]).unwrap();
        assert!(r.register("a", "http://127.0.0.1:2").is_err());
        assert!(r.register("a", "http://127.0.0.1:1").is_ok());
        assert!(r.register("b", "http://127.0.0.1:3").is_ok());
        assert!(r.register("b", "http://127.0.0.1:4").is_ok());
        assert_eq!(r.endpoint("b").unwrap(), "http://127.0.0.1:4");
        assert!(r.register("../x", "http://127.0.0.1:3").is_err());
        assert!(r.register("c", "file:///etc/passwd").is_err());
        assert!(r.register("c", "http://169.254.169.254:80/latest").is_err());
        r.learn("a", "http://127.0.0.1:9");
        assert_eq!(r.endpoint("a").unwrap(), "http://127.0.0.1:1");
    }
}
