//! Panic containment inside a plugin library: a guarded call, what it may hand back, and the
//! guarded objects' `Drop`. All of this is compiled into the plugin (through `export_plugin!`)
//! and runs with the plugin's own standard library, which alone can catch the plugin's panics.

use std::any::Any;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use super::guarded::{GuardedBackend, GuardedConnection, GuardedTransport};
use crate::plugin::{
    Backend, Endpoint, PluginError, Progress, RemoteExit, ScriptRequest, Transport, VmRequest,
};

fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

/// Runs a call into a plugin; a panic becomes a system failure naming what was being done, and
/// what the call returns is made safe to hand to hyperjob ([`Contained`]).
pub(super) fn guard<T: Contained>(what: &str, call: impl FnOnce() -> T) -> Result<T, PluginError> {
    catch_unwind(AssertUnwindSafe(|| call().contained())).map_err(|panic| {
        let _ = std::io::stderr().flush();
        PluginError::msg(format!(
            "the plugin panicked while {what}: {}",
            panic_message(panic.as_ref())
        ))
    })
}

/// What a guarded call returns, with nothing left in it whose code is the plugin's: hyperjob
/// formats and drops the value outside the guard.
pub(super) trait Contained {
    fn contained(self) -> Self;
}

impl<T> Contained for Result<T, PluginError> {
    fn contained(self) -> Self {
        self.map_err(contain_error)
    }
}

impl Contained for () {
    fn contained(self) -> Self {}
}

impl Contained for bool {
    fn contained(self) -> Self {
        self
    }
}

impl Contained for Duration {
    fn contained(self) -> Self {
        self
    }
}

impl Contained for Option<String> {
    fn contained(self) -> Self {
        self
    }
}

/// Checks are plain data: strings and a flag.
impl Contained for Vec<crate::plugin::Check> {
    fn contained(self) -> Self {
        self
    }
}

/// Endpoint kinds are plain `Copy` values.
impl Contained for Vec<crate::plugin::EndpointKind> {
    fn contained(self) -> Self {
        self
    }
}

/// An error's source chain as text: what a plugin-made source becomes before it leaves the
/// plugin. Its `Display` and `Drop` are plain string handling.
#[derive(Debug)]
struct Rendered {
    text: String,
    source: Option<Box<Rendered>>,
}

impl std::fmt::Display for Rendered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for Rendered {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn std::error::Error + 'static))
    }
}

/// Renders a plugin error's source chain to text and drops the original, both under their own
/// panic guard, inside the plugin.
fn contain_error(err: PluginError) -> PluginError {
    let PluginError::System {
        message,
        source: Some(source),
    } = err
    else {
        return err;
    };
    let rendered = catch_unwind(AssertUnwindSafe(|| {
        let mut texts = Vec::new();
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(source.as_ref());
        while let Some(error) = next {
            texts.push(error.to_string());
            next = error.source();
        }
        texts
    }))
    .unwrap_or_else(|panic| {
        vec![format!(
            "(the plugin panicked while describing this error: {})",
            panic_message(panic.as_ref())
        )]
    });
    if let Err(panic) = catch_unwind(AssertUnwindSafe(move || drop(source))) {
        let _ = writeln!(
            std::io::stderr(),
            "the plugin panicked while dropping an error (ignored): {}",
            panic_message(panic.as_ref())
        );
    }
    let chain = rendered.into_iter().rev().fold(None, |source, text| {
        Some(Box::new(Rendered { text, source }))
    });
    PluginError::System {
        message,
        source: chain.map(|chain| chain as Box<dyn std::error::Error + Send + Sync>),
    }
}

/// Drops a plugin object inside the guard: a panicking `Drop` is reported, not propagated.
fn drop_guarded<T: ?Sized>(what: &str, object: Box<T>) {
    if let Err(err) = guard(what, move || drop(object)) {
        let _ = writeln!(std::io::stderr(), "{err} (ignored)");
    }
}

/// What a guarded object holds once its plugin object was dropped.
struct Released;

impl Backend for Released {
    fn create(
        &self,
        _: &VmRequest,
        _: &dyn Progress,
        _: Instant,
        _: &AtomicBool,
    ) -> Result<(), PluginError> {
        Err(PluginError::msg("the plugin backend was released"))
    }

    fn wait_address(&self, _: &str, _: Instant, _: &AtomicBool) -> Result<Endpoint, PluginError> {
        Err(PluginError::msg("the plugin backend was released"))
    }

    fn destroy(&self, _: &str) -> Result<(), PluginError> {
        Err(PluginError::msg("the plugin backend was released"))
    }
}

impl Transport for Released {
    fn ready_timeout(&self) -> Duration {
        Duration::ZERO
    }

    fn wait_ready(&self, _: &Endpoint, _: Instant, _: &AtomicBool) -> Result<(), PluginError> {
        Err(PluginError::msg("the plugin transport was released"))
    }

    fn run_script(
        &self,
        _: &Endpoint,
        _: &ScriptRequest<'_>,
        _: &mut dyn Write,
        _: &mut dyn Write,
    ) -> Result<RemoteExit, PluginError> {
        Err(PluginError::msg("the plugin transport was released"))
    }
}

impl crate::plugin::Connection for Released {
    fn run_script(
        &mut self,
        _: &ScriptRequest<'_>,
        _: &mut dyn Write,
        _: &mut dyn Write,
    ) -> Result<RemoteExit, PluginError> {
        Err(PluginError::msg("the plugin connection was released"))
    }

    fn idle(&mut self) -> Result<(), PluginError> {
        Err(PluginError::msg("the plugin connection was released"))
    }
}

impl Drop for GuardedConnection {
    fn drop(&mut self) {
        let object = std::mem::replace(&mut self.0, Box::new(Released));
        drop_guarded("dropping the connection", object);
    }
}

impl Drop for GuardedBackend {
    fn drop(&mut self) {
        let object = std::mem::replace(&mut self.0, Box::new(Released));
        drop_guarded("dropping the backend", object);
    }
}

impl Drop for GuardedTransport {
    fn drop(&mut self) {
        let object = std::mem::replace(&mut self.0, Box::new(Released));
        drop_guarded("dropping the transport", object);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_panicking_call_becomes_a_system_failure() {
        let result: Result<Result<(), PluginError>, PluginError> =
            guard("testing", || panic!("boom"));

        let message = result.expect_err("panicked").to_string();
        assert_eq!(message, "the plugin panicked while testing: boom");
    }

    /// A plugin object whose `Drop` panics.
    struct PanicsOnDrop(Arc<AtomicBool>);

    impl Drop for PanicsOnDrop {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            panic!("drop is broken on purpose");
        }
    }

    impl Backend for PanicsOnDrop {
        fn create(
            &self,
            _: &VmRequest,
            _: &dyn Progress,
            _: Instant,
            _: &AtomicBool,
        ) -> Result<(), PluginError> {
            Ok(())
        }

        fn wait_address(
            &self,
            _: &str,
            _: Instant,
            _: &AtomicBool,
        ) -> Result<Endpoint, PluginError> {
            Err(PluginError::Unsupported("wait_address"))
        }

        fn destroy(&self, _: &str) -> Result<(), PluginError> {
            Err(PluginError::system("cannot destroy", BadSource))
        }
    }

    #[test]
    fn a_plugin_object_whose_drop_panics_is_dropped_inside_the_guard() {
        let dropped = Arc::new(AtomicBool::new(false));
        let guarded = GuardedBackend(Box::new(PanicsOnDrop(Arc::clone(&dropped))));

        // Outside any catch_unwind: a panic escaping here would fail the test.
        drop(guarded);

        assert!(dropped.load(std::sync::atomic::Ordering::SeqCst));
    }

    /// A plugin-made error source whose `Display` and `Drop` panic.
    #[derive(Debug)]
    struct BadSource;

    impl std::fmt::Display for BadSource {
        fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            panic!("display is broken on purpose")
        }
    }

    impl std::error::Error for BadSource {}

    impl Drop for BadSource {
        fn drop(&mut self) {
            panic!("drop of the error is broken on purpose")
        }
    }

    #[test]
    fn an_error_source_whose_display_and_drop_panic_reaches_the_host_as_text() {
        let guarded = GuardedBackend(Box::new(PanicsOnDrop(Arc::new(AtomicBool::new(false)))));

        let err = guarded.destroy("vm").expect_err("fails");

        // Formatted and dropped outside the guard: only plain text is left.
        let text = format!("{:#}", anyhow::Error::new(err));
        assert_eq!(
            text,
            "cannot destroy: (the plugin panicked while describing this error: display is broken on purpose)"
        );
    }

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1
                .as_deref()
                .map(|l| l as &(dyn std::error::Error + 'static))
        }
    }

    #[test]
    fn a_source_chain_is_kept_link_by_link_as_text() {
        let err = PluginError::system(
            "cannot start qemu",
            Layer("spawn failed", Some(Box::new(Layer("No such file", None)))),
        );

        let contained = contain_error(err);

        assert_eq!(
            format!("{:#}", anyhow::Error::new(contained)),
            "cannot start qemu: spawn failed: No such file"
        );
    }
}
