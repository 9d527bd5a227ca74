//! Published versions and aliases: publishing an immutable copy of `$LATEST`, resolving a
//! qualifier (a version number, `$LATEST` or an alias, with its canary weights) to the
//! record an invocation runs, and deleting one version with its pools and snapshots.

use std::collections::BTreeMap;

use spore_core::ControlError;
use spore_registry::{Alias, FunctionRecord, Versions};

use crate::Control;

/// What a new or changed alias says.
#[derive(Debug, Clone, Default)]
pub struct AliasSpec {
    /// The version it points to (None on update: unchanged).
    pub function_version: Option<String>,
    /// Its description (None on update: unchanged).
    pub description: Option<String>,
    /// `AdditionalVersionWeights` (None on update: unchanged).
    pub additional_weights: Option<BTreeMap<String, f64>>,
    /// The alias's `RevisionId` the caller expects (update).
    pub revision_id: Option<String>,
}

fn not_found(name: &str, qualifier: &str) -> ControlError {
    ControlError::NotFound(format!("{name}:{qualifier}"))
}

/// Checks an alias's name: Lambda's `(?!^[0-9]+$)([a-zA-Z0-9-_]+)`, 1 to 128 characters.
fn check_alias_name(alias: &str) -> Result<(), ControlError> {
    let ok = (1..=128).contains(&alias.len())
        && alias
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && !alias.chars().all(|c| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(ControlError::InvalidParameter(format!(
            "alias name {alias:?} must be 1 to 128 letters, digits, '-' or '_', and not a number"
        )))
    }
}

/// The version number `q` spells, if it spells one (digits, or what `u64`'s parser takes:
/// `+1`): only the canonical spelling (`[1-9][0-9]*`) is accepted, so that `01` can never
/// name version 1 in one place and nothing in another.
pub(crate) fn version_number(q: &str) -> Result<Option<u64>, ControlError> {
    let Ok(n) = q.parse::<u64>() else {
        return Ok(None);
    };
    if n == 0 || n.to_string() != q {
        let shown: String = q.chars().take(100).collect();
        return Err(ControlError::InvalidParameter(format!(
            "version {shown:?} must be $LATEST or a version number written without sign or leading zeros (1, 2, ...)"
        )));
    }
    Ok(Some(n))
}

/// Most characters of a function's, version's or alias's `Description` (Lambda's limit).
pub const MAX_DESCRIPTION: usize = 256;

/// Checks a `Description` against Lambda's limit.
pub fn check_description(description: Option<&str>) -> Result<(), ControlError> {
    match description {
        Some(d) if d.chars().count() > MAX_DESCRIPTION => {
            Err(ControlError::InvalidParameter(format!(
                "Description is {} characters long: at most {MAX_DESCRIPTION}",
                d.chars().count()
            )))
        }
        _ => Ok(()),
    }
}

/// Checks that `version` names `$LATEST` or a published version of `v` (canonically spelt).
fn check_version(name: &str, v: &Versions, version: &str) -> Result<(), ControlError> {
    if version != "$LATEST" && version_number(version)?.is_none() {
        let shown: String = version.chars().take(100).collect();
        return Err(ControlError::InvalidParameter(format!(
            "version {shown:?} must be $LATEST or a published version's number"
        )));
    }
    if version == "$LATEST"
        || version
            .parse()
            .is_ok_and(|n: u64| v.versions.contains_key(&n))
    {
        Ok(())
    } else {
        Err(not_found(name, version))
    }
}

/// Checks an alias's routing: at most one additional version, published (not `$LATEST`, nor
/// the primary one), with a weight in 0..=1.
fn check_routing(
    name: &str,
    v: &Versions,
    primary: &str,
    weights: &BTreeMap<String, f64>,
) -> Result<(), ControlError> {
    if weights.len() > 1 {
        return Err(ControlError::InvalidParameter(
            "RoutingConfig.AdditionalVersionWeights holds at most one version".into(),
        ));
    }
    for (version, w) in weights {
        if !(0.0..=1.0).contains(w) || !w.is_finite() {
            return Err(ControlError::InvalidParameter(format!(
                "RoutingConfig.AdditionalVersionWeights: weight {w} of version {version} must be between 0.0 and 1.0"
            )));
        }
        if version == "$LATEST" || primary == "$LATEST" {
            return Err(ControlError::InvalidParameter(
                "RoutingConfig: an alias routes between two published versions, not $LATEST".into(),
            ));
        }
        if version == primary {
            return Err(ControlError::InvalidParameter(format!(
                "RoutingConfig.AdditionalVersionWeights: version {version} is already the alias's FunctionVersion"
            )));
        }
        check_version(name, v, version)?;
    }
    Ok(())
}

impl Control {
    /// The record `qualifier` of `name` names: `$LATEST` (None too), a published version, or
    /// an alias's version. With `pick`, an alias with routing weights picks one of its two
    /// versions at random by weight (an invocation); without, its primary version.
    pub fn resolve_qualifier(
        &self,
        name: &str,
        qualifier: Option<&str>,
        pick: bool,
    ) -> Result<FunctionRecord, ControlError> {
        let reg = self.inner.registry.lock();
        let latest = reg
            .get(name)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(name.into()))?;
        let q = match qualifier {
            None | Some("$LATEST") => return Ok(latest),
            Some(q) => q,
        };
        let v = reg.versions(name);
        let version = if let Some(n) = version_number(q)? {
            n.to_string()
        } else {
            let alias = v.aliases.get(q).ok_or_else(|| not_found(name, q))?;
            let mut chosen = alias.function_version.clone();
            if pick {
                // A uniform draw in [0, 1) from 53 random bits (uuid's v4 comes from the OS's
                // random source; no second random crate for one number).
                let bits = uuid::Uuid::new_v4().as_u128() >> 75;
                let draw = bits as f64 / (1u64 << 53) as f64;
                let mut acc = 0.0;
                for (version, w) in &alias.additional_weights {
                    acc += w;
                    if draw < acc {
                        chosen = version.clone();
                        break;
                    }
                }
            }
            chosen
        };
        if version == "$LATEST" {
            return Ok(latest);
        }
        reg.get(&format!("{name}:{version}"))
            .cloned()
            .ok_or_else(|| not_found(name, q))
    }

    /// Publishes `$LATEST` of `name` as a new version, unless the last version has the same
    /// code and configuration (then that one is returned, as Lambda does). `code_sha256` and
    /// `revision_id`, when given, must match `$LATEST`'s.
    pub fn publish_version(
        &self,
        name: &str,
        code_sha256: Option<&str>,
        revision_id: Option<&str>,
        description: Option<String>,
    ) -> Result<FunctionRecord, ControlError> {
        check_description(description.as_deref())?;
        let mut reg = self.inner.registry.lock();
        let latest = reg
            .get(name)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(name.into()))?;
        if let Some(sha) = code_sha256.filter(|s| !s.is_empty()) {
            if sha != latest.code_sha256 {
                return Err(ControlError::InvalidParameter(format!(
                    "CodeSha256 {sha} does not match the function's code ({}): its code changed",
                    latest.code_sha256
                )));
            }
        }
        check_revision(&latest, revision_id)?;
        if latest
            .build
            .as_ref()
            .is_some_and(|b| !b.done && b.failed.is_none())
        {
            return Err(ControlError::ResourceConflict(format!(
                "The operation cannot be performed at this time. An update is in progress for resource: {}",
                self.function_arn(name, None)
            )));
        }
        let mut v = reg.versions(name);
        if let Some(last) = v.versions.values().next_back() {
            if last.same_code_and_config(&latest) {
                return Ok(last.clone());
            }
        }
        v.last += 1;
        let n = v.last;
        let mut rec = latest;
        rec.version = Some(n);
        if let Some(d) = description {
            rec.description = d;
        }
        rec.last_modified_ms = spore_registry::store::now_unix_ms();
        v.versions.insert(n, rec.clone());
        reg.put_versions(name, v)?;
        tracing::info!(function = %name, version = n, code = %rec.code_hex, "version published");
        Ok(rec)
    }

    /// Publishes `$LATEST` of `name` after a create or code update with `Publish=true`: at
    /// once, or, while the dependency build that deploy started runs, once it succeeds (None:
    /// the version is published then; nothing is published if the build fails).
    pub fn publish_when_built(&self, name: &str) -> Result<Option<FunctionRecord>, ControlError> {
        {
            let mut reg = self.inner.registry.lock();
            let mut waiting = false;
            reg.update_build(name, |b| {
                if !b.done && b.failed.is_none() {
                    b.publish = true;
                    waiting = true;
                }
            });
            if waiting {
                tracing::info!(function = %name, "a version is published once the dependency build succeeds");
                return Ok(None);
            }
        }
        self.publish_version(name, None, None, None).map(Some)
    }

    /// `$LATEST` and every published version of `name`, oldest version first.
    pub fn list_versions(&self, name: &str) -> Result<Vec<FunctionRecord>, ControlError> {
        let reg = self.inner.registry.lock();
        let latest = reg
            .get(name)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(name.into()))?;
        let mut out = vec![latest];
        out.extend(reg.versions(name).versions.into_values());
        Ok(out)
    }

    /// Deletes published version `version` of `name` (never `$LATEST`, nor one an alias
    /// routes to), with its instances, template and snapshots.
    pub fn delete_version(&self, name: &str, version: &str) -> Result<(), ControlError> {
        let key = {
            let mut reg = self.inner.registry.lock();
            if reg.get(name).is_none() {
                return Err(ControlError::NotFound(name.into()));
            }
            let mut v = reg.versions(name);
            let n = version_number(version)?.ok_or_else(|| not_found(name, version))?;
            if !v.versions.contains_key(&n) {
                return Err(not_found(name, version));
            }
            let aliases = v.aliases_of(version);
            if !aliases.is_empty() {
                return Err(ControlError::ResourceConflict(format!(
                    "Version {version} of {name} cannot be deleted: alias(es) {} route to it",
                    aliases.join(", ")
                )));
            }
            v.versions.remove(&n);
            v.provisioned.remove(version);
            reg.put_versions(name, v)?;
            format!("{name}:{n}")
        };
        self.inner.pools.retire(&key);
        self.inner.pools.snapshots().remove(&key);
        self.inner.pools.forget_warmup(&key);
        tracing::info!(function = %name, version, "version deleted");
        Ok(())
    }

    /// The keys (`name:N`) of every published version of `name`, for a whole delete.
    pub(crate) fn version_keys(&self, name: &str) -> Vec<String> {
        self.inner
            .registry
            .lock()
            .versions(name)
            .versions
            .keys()
            .map(|n| format!("{name}:{n}"))
            .collect()
    }

    /// Creates alias `alias` of `name`.
    pub fn create_alias(
        &self,
        name: &str,
        alias: &str,
        spec: AliasSpec,
    ) -> Result<Alias, ControlError> {
        check_alias_name(alias)?;
        check_description(spec.description.as_deref())?;
        let mut reg = self.inner.registry.lock();
        if reg.get(name).is_none() {
            return Err(ControlError::NotFound(name.into()));
        }
        let mut v = reg.versions(name);
        if v.aliases.contains_key(alias) {
            return Err(ControlError::ResourceConflict(format!(
                "Alias already exists: {name}:{alias}"
            )));
        }
        let version = spec
            .function_version
            .ok_or_else(|| ControlError::InvalidParameter("FunctionVersion is required".into()))?;
        check_version(name, &v, &version)?;
        let weights = spec.additional_weights.unwrap_or_default();
        check_routing(name, &v, &version, &weights)?;
        let a = Alias {
            name: alias.to_owned(),
            function_version: version,
            description: spec.description.unwrap_or_default(),
            additional_weights: weights,
            revision_id: uuid::Uuid::new_v4().to_string(),
        };
        v.aliases.insert(alias.to_owned(), a.clone());
        reg.put_versions(name, v)?;
        Ok(a)
    }

    /// Alias `alias` of `name`.
    pub fn get_alias(&self, name: &str, alias: &str) -> Result<Alias, ControlError> {
        let reg = self.inner.registry.lock();
        if reg.get(name).is_none() {
            return Err(ControlError::NotFound(name.into()));
        }
        reg.versions(name)
            .aliases
            .remove(alias)
            .ok_or_else(|| not_found(name, alias))
    }

    /// Changes alias `alias` of `name` (what `spec` gives; its `revision_id`, if given, must
    /// be the alias's).
    pub fn update_alias(
        &self,
        name: &str,
        alias: &str,
        spec: AliasSpec,
    ) -> Result<Alias, ControlError> {
        check_description(spec.description.as_deref())?;
        let mut reg = self.inner.registry.lock();
        if reg.get(name).is_none() {
            return Err(ControlError::NotFound(name.into()));
        }
        let mut v = reg.versions(name);
        let mut a = v
            .aliases
            .get(alias)
            .cloned()
            .ok_or_else(|| not_found(name, alias))?;
        if let Some(rid) = spec.revision_id.as_deref().filter(|r| !r.is_empty()) {
            if rid != a.revision_id {
                return Err(ControlError::PreconditionFailed(format!(
                    "RevisionId {rid} is not the alias's current one ({}): it changed since it was read",
                    a.revision_id
                )));
            }
        }
        if let Some(version) = spec.function_version {
            check_version(name, &v, &version)?;
            if version == "$LATEST" && v.provisioned.contains_key(alias) {
                return Err(ControlError::InvalidParameter(format!(
                    "Alias {alias} has provisioned concurrency, which $LATEST cannot have: delete its provisioned concurrency config first"
                )));
            }
            a.function_version = version;
        }
        if let Some(d) = spec.description {
            a.description = d;
        }
        if let Some(w) = spec.additional_weights {
            a.additional_weights = w;
        }
        check_routing(name, &v, &a.function_version, &a.additional_weights)?;
        a.revision_id = uuid::Uuid::new_v4().to_string();
        v.aliases.insert(alias.to_owned(), a.clone());
        reg.put_versions(name, v)?;
        Ok(a)
    }

    /// Deletes alias `alias` of `name`.
    pub fn delete_alias(&self, name: &str, alias: &str) -> Result<(), ControlError> {
        let mut reg = self.inner.registry.lock();
        if reg.get(name).is_none() {
            return Err(ControlError::NotFound(name.into()));
        }
        let mut v = reg.versions(name);
        v.aliases
            .remove(alias)
            .ok_or_else(|| not_found(name, alias))?;
        v.provisioned.remove(alias);
        reg.put_versions(name, v)?;
        Ok(())
    }

    /// Every alias of `name`, by name.
    pub fn list_aliases(&self, name: &str) -> Result<Vec<Alias>, ControlError> {
        let reg = self.inner.registry.lock();
        if reg.get(name).is_none() {
            return Err(ControlError::NotFound(name.into()));
        }
        Ok(reg.versions(name).aliases.into_values().collect())
    }

    /// Checks that `revision_id`, if given, is `name`'s (`$LATEST`) current one.
    pub fn check_revision(
        &self,
        name: &str,
        revision_id: Option<&str>,
    ) -> Result<(), ControlError> {
        check_revision(&self.get_function(name)?, revision_id)
    }
}

/// `PreconditionFailed` unless `revision_id` (if given) is `rec`'s.
pub(crate) fn check_revision(
    rec: &FunctionRecord,
    revision_id: Option<&str>,
) -> Result<(), ControlError> {
    match revision_id.filter(|r| !r.is_empty()) {
        Some(rid) if rid != rec.revision_id() => Err(ControlError::PreconditionFailed(format!(
            "RevisionId {rid} is not the function's current one ({}): it changed since it was read",
            rec.revision_id()
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_names() {
        assert!(check_alias_name("live").is_ok());
        assert!(check_alias_name("blue-green_2").is_ok());
        for bad in ["", "12", "a:b", "a b", &"x".repeat(129)] {
            assert!(check_alias_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn version_spellings() {
        assert_eq!(version_number("1").unwrap(), Some(1));
        assert_eq!(version_number("30").unwrap(), Some(30));
        assert_eq!(version_number("live").unwrap(), None);
        assert_eq!(version_number("1live").unwrap(), None);
        for bad in ["01", "+1", "0003", "0"] {
            assert!(version_number(bad).is_err(), "{bad:?}");
        }
        let v = Versions::default();
        assert!(check_version("f", &v, "$LATEST").is_ok());
        assert!(matches!(
            check_version("f", &v, "01"),
            Err(ControlError::InvalidParameter(_))
        ));
        assert!(matches!(
            check_version("f", &v, "1"),
            Err(ControlError::NotFound(_))
        ));
    }
}
