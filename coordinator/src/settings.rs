//! Loading experiment files: serde defaults, then the TOML file, then `TRIBUTARY_*` environment
//! overrides, then `--set key=value` flags (the `config` crate does the layering).
//!
//! Environment overrides use `__` between nested keys: `TRIBUTARY_SELECTION__QUORUM=3` sets
//! `selection.quorum`. Variables without `__` (such as `TRIBUTARY_DATA_DIR`) belong to the server's
//! own flags and are not read here.

use std::collections::HashMap;
use std::path::Path;

use config::{Config, Environment, File, FileFormat};
use tributary_shared::config::ExperimentConfig;

/// An experiment file that could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// The file is unreadable, not TOML, or has unknown keys or wrong types.
    #[error("{origin}: {detail}")]
    Parse {
        /// The file (and overrides) being read.
        origin: String,
        /// What the parser said, naming the key.
        detail: String,
    },
    /// A value is out of range.
    #[error("{origin}: {source}")]
    Invalid {
        /// The file.
        origin: String,
        /// The key and why.
        source: tributary_shared::config::ConfigError,
    },
    /// A `--set` flag is not `key=value`.
    #[error("--set {0:?} is not key=value")]
    BadOverride(String),
}

/// Environment variables that override experiment keys, taken from `vars`.
pub fn experiment_env_overrides(
    vars: impl IntoIterator<Item = (String, String)>,
) -> HashMap<String, String> {
    vars.into_iter()
        .filter(|(key, _)| {
            key.strip_prefix("TRIBUTARY_")
                .is_some_and(|rest| rest.contains("__"))
        })
        .collect()
}

/// Loads, layers and validates an experiment file.
pub fn load_experiment(
    path: &Path,
    env: HashMap<String, String>,
    overrides: &[String],
) -> Result<ExperimentConfig, SettingsError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|error| SettingsError::Parse {
        origin: origin.clone(),
        detail: error.to_string(),
    })?;
    load_experiment_str(&text, &origin, env, overrides)
}

/// Like [`load_experiment`] from a TOML string (`origin` names it in errors).
pub fn load_experiment_str(
    text: &str,
    origin: &str,
    env: HashMap<String, String>,
    overrides: &[String],
) -> Result<ExperimentConfig, SettingsError> {
    let mut builder = Config::builder()
        .add_source(File::from_str(text, FileFormat::Toml))
        .add_source(
            Environment::with_prefix("TRIBUTARY")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(env)),
        );
    for item in overrides {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| SettingsError::BadOverride(item.clone()))?;
        builder = builder
            .set_override(key.trim(), parse_scalar(value.trim()))
            .map_err(|error| SettingsError::Parse {
                origin: origin.to_owned(),
                detail: error.to_string(),
            })?;
    }
    let parsed: ExperimentConfig =
        builder
            .build()
            .and_then(Config::try_deserialize)
            .map_err(|error| SettingsError::Parse {
                origin: origin.to_owned(),
                detail: error.to_string(),
            })?;
    parsed.validate().map_err(|source| SettingsError::Invalid {
        origin: origin.to_owned(),
        source,
    })?;
    Ok(parsed)
}

fn parse_scalar(text: &str) -> config::Value {
    if let Ok(value) = text.parse::<i64>() {
        return value.into();
    }
    if let Ok(value) = text.parse::<f64>() {
        return value.into();
    }
    if let Ok(value) = text.parse::<bool>() {
        return value.into();
    }
    text.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[experiment]
name = "unit"
rounds = 3

[adapter]
kind = "synthetic"
params = 100

[training]
codec = { kind = "int4", block = 32 }

[aggregation]
rule = { kind = "trimmed_mean", trim_fraction = 0.1 }
"#;

    fn load(
        text: &str,
        env: &[(&str, &str)],
        overrides: &[&str],
    ) -> Result<ExperimentConfig, SettingsError> {
        let env = experiment_env_overrides(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        load_experiment_str(text, "test.toml", env, &overrides)
    }

    #[test]
    fn file_env_and_flags_layer_in_order() {
        let config = load(BASE, &[], &[]).unwrap();
        assert_eq!(config.experiment.rounds, 3);
        assert_eq!(config.selection.quorum, 2);
        assert_eq!(
            config.training.codec,
            tributary_shared::codec::Codec::Int4 { block: 32 }
        );
        let config = load(
            BASE,
            &[
                ("TRIBUTARY_SELECTION__QUORUM", "3"),
                ("TRIBUTARY_DATA_DIR", "/x"),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(config.selection.quorum, 3);
        let config = load(
            BASE,
            &[("TRIBUTARY_EXPERIMENT__ROUNDS", "5")],
            &["experiment.rounds=7"],
        )
        .unwrap();
        assert_eq!(config.experiment.rounds, 7);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let error = load(&format!("{BASE}\n[selection]\nquorom = 2\n"), &[], &[]).unwrap_err();
        assert!(error.to_string().contains("quorom"), "{error}");
        let error = load(BASE, &[("TRIBUTARY_SELECTION__QUORUM", "0")], &[]).unwrap_err();
        assert!(error.to_string().contains("selection.quorum"), "{error}");
        let error = load(BASE, &[], &["selection.quorum=many"]).unwrap_err();
        assert!(error.to_string().contains("quorum"), "{error}");
        assert!(matches!(
            load(BASE, &[], &["novalue"]),
            Err(SettingsError::BadOverride(_))
        ));
    }
}
