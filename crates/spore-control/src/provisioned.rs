//! Provisioned concurrency: a number of instances of a published version (or of an alias's
//! version) kept started, by the function's fast paths (a fork of the version's cfork
//! template, a restore from its snapshot, else an import), so that its invocations find them
//! warm. Never `$LATEST`, as Lambda. A keeper tops the pools up every second (after a keep-alive
//! or memory-budget eviction too).

use spore_core::ControlError;
use spore_pool::Checkout;
use spore_registry::Provisioned;

use crate::Control;

/// A provisioned-concurrency setting and how far it is.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProvisionedStatus {
    /// The version or alias.
    pub qualifier: String,
    /// Instances asked for.
    pub requested: u32,
    /// Instances started now (at most `requested`).
    pub available: u32,
    /// `IN_PROGRESS` until `available` reaches `requested`, then `READY`.
    pub status: &'static str,
    /// When it was set, ms since the epoch.
    pub last_modified_ms: u64,
}

impl Control {
    fn provisioned_status(
        &self,
        name: &str,
        qualifier: &str,
        p: &Provisioned,
    ) -> ProvisionedStatus {
        let total = self
            .resolve_qualifier(name, Some(qualifier), false)
            .map(|rec| self.inner.pools.instance_counts(&rec.key()).1)
            .unwrap_or(0);
        let available = total.min(p.requested);
        ProvisionedStatus {
            qualifier: qualifier.to_owned(),
            requested: p.requested,
            available,
            status: if available >= p.requested {
                "READY"
            } else {
                "IN_PROGRESS"
            },
            last_modified_ms: p.last_modified_ms,
        }
    }

    /// Keeps `n` instances of `qualifier` (a published version or an alias) of `name` started.
    pub fn put_provisioned(
        &self,
        name: &str,
        qualifier: &str,
        n: u32,
    ) -> Result<ProvisionedStatus, ControlError> {
        if qualifier == "$LATEST" {
            return Err(ControlError::InvalidParameter(
                "Provisioned concurrency cannot be set on $LATEST: publish a version (or make an alias) and set it there".into(),
            ));
        }
        let rec = self.resolve_qualifier(name, Some(qualifier), false)?;
        if rec.version.is_none() {
            return Err(ControlError::InvalidParameter(format!(
                "Provisioned concurrency cannot be set on alias {qualifier}: it points at $LATEST (point it at a published version)"
            )));
        }
        let max = self.inner.pools.max_instances(&rec);
        if n == 0 || n > max {
            return Err(ControlError::InvalidParameter(format!(
                "ProvisionedConcurrentExecutions {n} must be from 1 to the function's most instances ({max})"
            )));
        }
        let p = Provisioned {
            requested: n,
            last_modified_ms: spore_registry::store::now_unix_ms(),
        };
        {
            let mut reg = self.inner.registry.lock();
            let mut v = reg.versions(name);
            v.provisioned.insert(qualifier.to_owned(), p.clone());
            reg.put_versions(name, v)?;
        }
        let this = self.clone();
        tokio::spawn(async move { this.keep_provisioned().await });
        Ok(self.provisioned_status(name, qualifier, &p))
    }

    /// The provisioned concurrency of `qualifier` of `name` (None: none is set).
    pub fn get_provisioned(
        &self,
        name: &str,
        qualifier: &str,
    ) -> Result<Option<ProvisionedStatus>, ControlError> {
        self.get_function(name)?;
        crate::versions::version_number(qualifier)?;
        let p = self
            .inner
            .registry
            .lock()
            .versions(name)
            .provisioned
            .remove(qualifier);
        Ok(p.map(|p| self.provisioned_status(name, qualifier, &p)))
    }

    /// Every provisioned-concurrency setting of `name`.
    pub fn list_provisioned(&self, name: &str) -> Result<Vec<ProvisionedStatus>, ControlError> {
        self.get_function(name)?;
        let all = self.inner.registry.lock().versions(name).provisioned;
        Ok(all
            .iter()
            .map(|(q, p)| self.provisioned_status(name, q, p))
            .collect())
    }

    /// Stops keeping instances of `qualifier` of `name` (they are reaped as any idle ones);
    /// false if none was set.
    pub fn delete_provisioned(&self, name: &str, qualifier: &str) -> Result<bool, ControlError> {
        crate::versions::version_number(qualifier)?;
        let mut reg = self.inner.registry.lock();
        if reg.get(name).is_none() {
            return Err(ControlError::NotFound(name.into()));
        }
        let mut v = reg.versions(name);
        if v.provisioned.remove(qualifier).is_none() {
            return Ok(false);
        }
        reg.put_versions(name, v)?;
        Ok(true)
    }

    /// Starts the instances provisioned concurrency is short of, one at a time.
    pub(crate) async fn keep_provisioned(&self) {
        let _one = self.inner.keeper.lock().await;
        let all = self.inner.registry.lock().provisioned();
        for (name, qualifier, requested) in all {
            let Ok(rec) = self.resolve_qualifier(&name, Some(&qualifier), false) else {
                continue;
            };
            if rec.version.is_none() {
                continue; // never $LATEST
            }
            let key = rec.key();
            let mut tries = 0;
            while self.inner.pools.instance_counts(&key).1 < requested && tries < requested {
                tries += 1;
                if self.inner.work.is_draining() {
                    return;
                }
                let how = Checkout {
                    force_cold: true,
                    ..Checkout::default()
                };
                match self.inner.pools.checkout(&rec, how).await {
                    Ok(Ok(lease)) => self.inner.pools.checkin(&rec, lease.instance, true),
                    Ok(Err(e)) => {
                        self.inner.pools.log(&name).push_text(&format!(
                            "provisioned concurrency of {key}: starting an instance failed: {e}"
                        ));
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(function = %key, "provisioned concurrency: {e}");
                        break;
                    }
                }
            }
        }
    }
}
