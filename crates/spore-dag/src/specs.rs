//! Deployed DAG specs, stored as `<data-dir>/dags/<name>.json` (written atomically).

use spore_core::dag::DagSpec;
use spore_core::ControlError;

use crate::{Dags, Plan};

impl Dags {
    fn dag_path(&self, name: &str) -> std::path::PathBuf {
        self.inner.dags_dir.join(format!("{name}.json"))
    }

    /// Deploys (creates or replaces) a DAG after checking it and that its functions exist.
    pub fn put_dag(&self, spec: DagSpec) -> Result<DagSpec, ControlError> {
        spec.validate()
            .map_err(|e| ControlError::InvalidParameter(e.to_string()))?;
        let plan = Plan::new(self, spec.clone())?;
        if spec.transport == spore_core::dag::Transport::Shm {
            for (n, rec) in plan.recs.iter().enumerate() {
                if rec.manifest.runtime != spore_core::Runtime::Python3 {
                    return Err(ControlError::InvalidParameter(format!(
                        "DAG {:?}: node {:?} runs function {:?} ({}); the shm transport serves Python functions only (its nodes share memory rings through a Python module): deploy the DAG with transport = \"http\"",
                        spec.name,
                        plan.id(n),
                        rec.manifest.name,
                        rec.manifest.runtime
                    )));
                }
            }
        }
        let path = self.dag_path(&spec.name);
        let io =
            |e: std::io::Error| ControlError::Internal(format!("storing DAG {:?}: {e}", spec.name));
        std::fs::create_dir_all(path.parent().expect("in the dags dir")).map_err(io)?;
        spore_registry::store::write_atomic(
            &path,
            &serde_json::to_vec_pretty(&spec).expect("a spec serializes"),
        )
        .map_err(io)?;
        self.evict_pipelines(|p| p.dag() == spec.name);
        Ok(spec)
    }

    /// A deployed DAG.
    pub fn get_dag(&self, name: &str) -> Result<DagSpec, ControlError> {
        spore_core::validate_function_name(name)
            .map_err(|_| ControlError::NotFound(format!("DAG {name}")))?;
        let bytes = std::fs::read(self.dag_path(name))
            .map_err(|_| ControlError::NotFound(format!("DAG {name}")))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ControlError::Internal(format!("stored DAG {name:?} is unreadable: {e}")))
    }

    /// All deployed DAGs, by name.
    pub fn list_dags(&self) -> Vec<DagSpec> {
        let mut out: Vec<DagSpec> = std::fs::read_dir(self.inner.dags_dir.clone())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".json")
                    .map(str::to_owned)
            })
            .filter_map(|name| self.get_dag(&name).ok())
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Removes a DAG (its functions stay).
    pub fn delete_dag(&self, name: &str) -> Result<DagSpec, ControlError> {
        let spec = self.get_dag(name)?;
        std::fs::remove_file(self.dag_path(name))
            .map_err(|e| ControlError::Internal(format!("removing DAG {name:?}: {e}")))?;
        self.evict_pipelines(|p| p.dag() == name);
        Ok(spec)
    }
}
