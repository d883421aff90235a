//! Test fixture: a well-formed shared-library plugin whose backend `panicky` panics when asked
//! to create a VM. hyperjob must turn that into a system failure, not an abort.

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use hyperjob_core::plugin::Progress;
use hyperjob_core::registry::PluginContext;
use hyperjob_core::{Backend, Endpoint, PluginError, VmRequest};

struct Panicky;

impl Backend for Panicky {
    fn create(
        &self,
        _request: &VmRequest,
        _progress: &dyn Progress,
        _deadline: Instant,
        _cancel: &AtomicBool,
    ) -> Result<(), PluginError> {
        panic!("panicky backend: create is broken on purpose")
    }

    fn wait_address(&self, _: &str, _: Instant, _: &AtomicBool) -> Result<Endpoint, PluginError> {
        Err(PluginError::Unsupported("wait_address"))
    }

    fn destroy(&self, _vm_name: &str) -> Result<(), PluginError> {
        Ok(())
    }
}

fn build(_ctx: &PluginContext, _config: &str) -> Result<Box<dyn Backend>, PluginError> {
    Ok(Box::new(Panicky))
}

hyperjob_core::export_plugin! {
    backends: ["panicky" => build],
    transports: [],
}
