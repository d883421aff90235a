//! Domains that look like job VMs but are not this installation's: to show that nothing
//! hyperjob does destroys them.

use std::path::Path;
use std::process::Command;

use super::{virsh, TestEnv, Workspace};

/// hyperjob's ownership record for job `job_id` with deadline `deadline_unix`, made by the
/// installation whose `state_dir` is `owner`: what libvirt keeps as the domain's metadata.
pub fn hyperjob_metadata(job_id: i64, deadline_unix: u64, owner: &Path) -> String {
    format!(
        "<hyperjob:job xmlns:hyperjob='http://hyperjob.dev/xmlns/job/1'><hyperjob:id>{job_id}</hyperjob:id>\
         <hyperjob:created>1</hyperjob:created><hyperjob:deadline>{deadline_unix}</hyperjob:deadline>\
         <hyperjob:owner>{}</hyperjob:owner></hyperjob:job>",
        owner.display()
    )
}

/// A tiny transient domain without a disk (SeaBIOS finds nothing to boot) named like a job
/// VM, optionally with an ownership record; destroyed again on drop.
pub struct Lookalike<'a> {
    env: &'a TestEnv,
    pub name: String,
}

impl<'a> Lookalike<'a> {
    pub fn create(
        env: &'a TestEnv,
        ws: &Workspace,
        name: String,
        metadata: Option<String>,
    ) -> Self {
        let xml = format!(
            "<domain type='qemu'><name>{name}</name>{}<memory unit='MiB'>32</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64'>hvm</type></os><devices><memballoon model='none'/></devices></domain>",
            metadata
                .map(|m| format!("<metadata>{m}</metadata>"))
                .unwrap_or_default()
        );
        let path = ws.dir.join(format!("{name}.xml"));
        std::fs::write(&path, xml).expect("domain XML");
        virsh(&env.libvirt_uri, &["create", path.to_str().expect("utf-8")]);
        std::fs::remove_file(&path).expect("remove domain XML");
        Self { env, name }
    }
}

impl Drop for Lookalike<'_> {
    fn drop(&mut self) {
        let _ = Command::new("virsh")
            .args(["-q", "-c", &self.env.libvirt_uri, "destroy", &self.name])
            .output();
    }
}
