use std::sync::Arc;

use super::*;
use crate::registry::{Entry, Origin, PluginContext};

/// A backend that is only ever built, never run.
struct Unused;

impl Backend for Unused {
    fn create(
        &self,
        _: &VmRequest,
        _: &dyn crate::plugin::Progress,
        _: Instant,
        _: &AtomicBool,
    ) -> Result<(), PluginError> {
        Err(PluginError::Unsupported("create"))
    }

    fn wait_address(&self, _: &str, _: Instant, _: &AtomicBool) -> Result<Endpoint, PluginError> {
        Err(PluginError::Unsupported("wait_address"))
    }

    fn destroy(&self, _: &str) -> Result<(), PluginError> {
        Ok(())
    }
}

/// A backend whose build judges its table with `judge`.
fn registry_with(name: &str, judge: fn(&toml::Table) -> Result<(), PluginError>) -> Registry {
    let mut registry = Registry::default();
    registry
        .add_backend(Entry {
            name: name.to_string(),
            version: "0".to_string(),
            origin: Origin::BuiltIn,
            build: Arc::new(move |_: &PluginContext, table: &toml::Table| {
                judge(table).map(|()| Box::new(Unused) as Box<dyn Backend>)
            }),
        })
        .expect("one backend");
    registry
}

fn config(backend: &str) -> Config {
    Config::parse(
        Path::new("/etc/hyperjob/check.toml"),
        &format!("backend = \"{backend}\"\ntransport = \"ssh\"\n"),
    )
    .expect("config")
}

fn deny_unknown(table: &toml::Table) -> Result<(), PluginError> {
    match table.keys().next() {
        Some(key) => Err(PluginError::Config(format!("unknown field `{key}`"))),
        None => Ok(()),
    }
}

#[test]
fn a_table_with_an_unknown_key_refused_naming_it_passes() {
    let registry = registry_with("strict", deny_unknown);

    let check = refuses_unknown_key(&config("strict"), &registry, Kind::Backend);

    assert!(check.ok, "{check:?}");
    assert!(
        check.what.contains(
            "config file /etc/hyperjob/check.toml [backends.strict]: unknown field \
             `hyperjob_plugin_check_unknown_key`"
        ),
        "{check:?}"
    );
}

#[test]
fn a_table_with_an_unknown_key_accepted_fails_the_clause() {
    let registry = registry_with("lenient", |_| Ok(()));

    let check = refuses_unknown_key(&config("lenient"), &registry, Kind::Backend);

    assert!(!check.ok);
    assert_eq!(
        check.what,
        "bad config: [backends.lenient] with an unknown key"
    );
    assert!(
        check
            .fix
            .as_deref()
            .is_some_and(|f| f.starts_with("was accepted")),
        "{check:?}"
    );
}

#[test]
fn an_unknown_key_refused_as_another_error_fails_the_clause() {
    let registry = registry_with("vague", |table| match table.is_empty() {
        true => Ok(()),
        false => Err(PluginError::msg("something is wrong")),
    });

    let check = refuses_unknown_key(&config("vague"), &registry, Kind::Backend);

    assert!(!check.ok);
    assert!(
        check
            .fix
            .as_deref()
            .is_some_and(|f| f.contains("not as a config error naming")),
        "{check:?}"
    );
}

#[test]
fn the_checks_job_ids_are_no_gitlab_job_s_and_gc_reads_its_vm_name_back() {
    let config = config("libvirt");

    let id = job_id(4242);

    assert!(id > i64::MAX as u64);
    assert_eq!(config.job_id_of(&config.vm_name(id)), Some(id));
    assert_ne!(job_id(4243), id);
}

#[test]
fn an_unsupported_operation_skips_and_an_error_fails() {
    let skipped = judge(Err::<(), _>(PluginError::Unsupported("halt")), |()| {
        Ok(String::new())
    });
    let failed = judge(Err::<(), _>(PluginError::msg("boom")), |()| {
        Ok(String::new())
    });
    let judged = judge(Ok(3), |n| Err(format!("got {n}")));

    assert!(matches!(skipped, Verdict::Skip(why) if why == "not supported (optional)"));
    assert!(matches!(failed, Verdict::Fail(why) if why == "boom"));
    assert!(matches!(judged, Verdict::Fail(why) if why == "got 3"));
}
