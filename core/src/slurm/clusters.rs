//! The Slurm connections of one tool run, one per configured cluster.

use std::collections::BTreeMap;

use crate::config::Cluster;
use crate::error::Failure;
use crate::slurm::Slurm;
use crate::ticket::AllocSection;

/// The Slurm connections of one run (`nsh-alloc`, `nsh-run`), one per
/// cluster, made when first needed.
#[derive(Default)]
pub struct Clusters {
    connections: BTreeMap<String, Slurm>,
}

impl Clusters {
    /// The connection to `cluster`, made now if this is the first use.
    ///
    /// # Errors
    /// Connecting failed (the cluster is named in the message).
    pub fn get(&mut self, cluster: &Cluster) -> Result<&Slurm, Failure> {
        if !self.connections.contains_key(&cluster.name) {
            let slurm = Slurm::connect(cluster)
                .map_err(|f| crate::slurm::rejection::classify_connect(cluster, f))?;
            self.connections.insert(cluster.name.clone(), slurm);
        }
        Ok(&self.connections[&cluster.name])
    }

    /// The connection to `cluster` as a ticket's `alloc` section found it
    /// ([`Slurm::resume`]: no request until one is needed).
    pub fn resume(&mut self, cluster: &Cluster, alloc: &AllocSection) -> Result<&Slurm, Failure> {
        if !self.connections.contains_key(&cluster.name) {
            let slurm = Slurm::resume(cluster, alloc.api.as_deref(), alloc.slurm.as_deref())
                .map_err(|f| f.context(format!("cluster {}", cluster.name)))?;
            self.connections.insert(cluster.name.clone(), slurm);
        }
        Ok(&self.connections[&cluster.name])
    }
}
