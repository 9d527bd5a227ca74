//! The control plane as its subsystems see it: the [`UnitHost`] a unit's links run
//! invocations and deploys on, and the [`Invoker`] relayed DAG hops go through. Both hold the
//! control plane weakly, so that a subsystem never keeps it alive.

use std::sync::{Arc, Weak};

use bytes::Bytes;
use spore_cluster::{BoxFuture, UnitHost};
use spore_core::{ControlError, Invocation, InvokeOptions};
use spore_dag::Invoker;
use spore_registry::{FunctionRecord, FunctionSpec};
use spore_shim::UnitLoad;

use crate::{Control, Inner};

/// A weak handle on the control plane.
struct Host(Weak<Inner>);

impl Host {
    fn control(&self) -> Result<Control, ControlError> {
        self.0
            .upgrade()
            .map(|inner| Control { inner })
            .ok_or_else(|| ControlError::Unavailable("the daemon is shutting down".into()))
    }
}

/// `control` as a unit's links see it.
pub(crate) fn unit_host(control: &Control) -> Arc<dyn UnitHost> {
    Arc::new(Host(Arc::downgrade(&control.inner)))
}

/// `control`'s invocation path, for relayed DAG hops.
pub(crate) fn invoker(control: &Control) -> Arc<dyn Invoker> {
    Arc::new(Host(Arc::downgrade(&control.inner)))
}

impl UnitHost for Host {
    fn load(&self) -> UnitLoad {
        self.control().map(|c| c.load()).unwrap_or_default()
    }

    fn draining(&self) -> bool {
        self.control().map_or(true, |c| c.inner.work.is_draining())
    }

    fn invoke(
        &self,
        name: String,
        payload: Bytes,
        opts: InvokeOptions,
    ) -> BoxFuture<'static, Result<Invocation, ControlError>> {
        let control = self.control();
        Box::pin(async move { control?.invoke(&name, payload, opts).await })
    }

    fn install(&self, spec: FunctionSpec, zip: &[u8]) -> Result<FunctionRecord, ControlError> {
        let c = self.control()?;
        let (_, hex) = spore_registry::code::digest(zip);
        match c.get_function(&spec.manifest.name) {
            Ok(r) if r.manifest == spec.manifest && r.code_hex == hex => Ok(r),
            Ok(_) => {
                c.update_config(spec.clone())?;
                c.update_code(&spec.manifest.name, zip)
            }
            Err(_) => c.create_function(spec, zip),
        }
    }

    fn remove(&self, name: &str) -> Result<(), ControlError> {
        self.control()?.delete_function(name).map(|_| ())
    }

    fn prewarm(&self, name: &str) {
        if let Ok(c) = self.control() {
            c.prewarm(name);
        }
    }
}

impl Invoker for Host {
    fn invoke(
        &self,
        name: String,
        payload: Bytes,
        opts: InvokeOptions,
    ) -> BoxFuture<'static, Result<Invocation, ControlError>> {
        UnitHost::invoke(self, name, payload, opts)
    }
}
