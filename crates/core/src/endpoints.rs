//! Endpoint kinds: the backend declares which it hands out, the transport which it reaches
//! ([`crate::plugin::EndpointKind`]). `config` refuses a pair with none in common; `prepare`
//! refuses an endpoint of a kind its backend did not declare, or one the transport cannot reach.

use anyhow::bail;

use crate::config::Config;
use crate::plugin::{Backend, Endpoint, EndpointKind, Transport};

/// Kinds in a stable order, without repeats.
fn sorted(mut kinds: Vec<EndpointKind>) -> Vec<EndpointKind> {
    kinds.sort();
    kinds.dedup();
    kinds
}

/// Fails, in one line naming both plugins and the kinds, when the transport reaches none of
/// the kinds of endpoint the backend hands out.
pub fn check_pair(
    config: &Config,
    backend: &dyn Backend,
    transport: &dyn Transport,
) -> anyhow::Result<()> {
    pair_error(
        &config.backend,
        &sorted(backend.endpoint_kinds()),
        &config.transport,
        &sorted(transport.endpoint_kinds()),
    )
    .map_or(Ok(()), |why| bail!("{why}"))
}

fn pair_error(
    backend: &str,
    produces: &[EndpointKind],
    transport: &str,
    accepts: &[EndpointKind],
) -> Option<String> {
    if produces.iter().any(|kind| accepts.contains(kind)) {
        return None;
    }
    if produces.is_empty() {
        return Some(format!(
            "backend {backend:?} declares no endpoint kinds, so transport {transport:?} (which \
             reaches {}) has nothing to reach",
            EndpointKind::list(accepts)
        ));
    }
    Some(format!(
        "backend {backend:?} hands out {} endpoints, but transport {transport:?} reaches only {}: \
         choose a transport that reaches one of them, or configure the backend for one it reaches",
        EndpointKind::list(produces),
        EndpointKind::list(accepts),
    ))
}

/// Fails when the backend handed out an endpoint of a kind it did not declare, or one the
/// transport does not reach.
pub fn check_endpoint(
    config: &Config,
    backend: &dyn Backend,
    transport: &dyn Transport,
    endpoint: &Endpoint,
) -> anyhow::Result<()> {
    endpoint_error(
        &config.backend,
        &sorted(backend.endpoint_kinds()),
        &config.transport,
        &sorted(transport.endpoint_kinds()),
        endpoint,
    )
    .map_or(Ok(()), |why| bail!("{why}"))
}

fn endpoint_error(
    backend: &str,
    produces: &[EndpointKind],
    transport: &str,
    accepts: &[EndpointKind],
    endpoint: &Endpoint,
) -> Option<String> {
    let kind = endpoint.kind();
    if !produces.contains(&kind) {
        return Some(format!(
            "backend {backend:?} handed out a {kind} endpoint ({endpoint}), but declares only {} \
             (a bug in the backend)",
            EndpointKind::list(produces)
        ));
    }
    if !accepts.contains(&kind) {
        return Some(format!(
            "backend {backend:?} handed out a {kind} endpoint ({endpoint}), but transport \
             {transport:?} reaches only {}",
            EndpointKind::list(accepts)
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use EndpointKind::{Tcp, Unix, Vsock};

    #[test]
    fn a_pair_with_a_kind_in_common_passes() {
        assert_eq!(pair_error("qemu", &[Tcp], "ssh", &[Tcp, Unix]), None);
        assert_eq!(pair_error("qemu", &[Unix], "ssh", &[Tcp, Unix]), None);
        assert_eq!(pair_error("b", &[Tcp, Vsock], "t", &[Vsock]), None);
    }

    #[test]
    fn a_pair_with_no_kind_in_common_names_both_and_the_kinds() {
        assert_eq!(
            pair_error("qemu", &[Unix], "ssh-cli", &[Tcp]).as_deref(),
            Some(
                "backend \"qemu\" hands out unix endpoints, but transport \"ssh-cli\" reaches \
                 only tcp: choose a transport that reaches one of them, or configure the backend \
                 for one it reaches"
            )
        );
        assert!(pair_error("b", &[], "t", &[Tcp])
            .expect("refused")
            .contains("backend \"b\" declares no endpoint kinds"));
    }

    #[test]
    fn an_undeclared_or_unreachable_endpoint_is_refused() {
        let unix = Endpoint::unix("/run/vm.sock");
        assert_eq!(endpoint_error("b", &[Unix], "t", &[Tcp, Unix], &unix), None);
        assert_eq!(
            endpoint_error("b", &[Tcp], "t", &[Tcp, Unix], &unix).as_deref(),
            Some(
                "backend \"b\" handed out a unix endpoint (unix:/run/vm.sock), but declares \
                 only tcp (a bug in the backend)"
            )
        );
        assert!(endpoint_error("b", &[Tcp, Unix], "t", &[Tcp], &unix)
            .expect("refused")
            .contains("but transport \"t\" reaches only tcp"));
    }
}
