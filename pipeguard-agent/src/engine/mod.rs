//! The enforcement engine: the kernel programs and their maps, behind one handle.
//!
//! Both `pipeguard exec` and the agent drive it the same way: load, attach to a cgroup,
//! write allowlists under a policy id, then point pod cgroups at a policy id.

mod attach;
pub mod dns;
pub mod events;
mod generation;
mod names;
mod object;
pub mod pins;
mod slots;
mod socket_records;
pub mod stats;
mod tables;

use std::{os::fd::AsFd, path::Path};

use aya::{Ebpf, EbpfLoader};
use aya_log::EbpfLogger;
use pipeguard_common::{
    CONFIG_FLOW_STATS, CONFIG_REPORT_ALLOWED, Config, DNS_LEARN_NAMES, DNS_REPORT_QUERIES, DnsConfig,
    REPLY_WINDOW_NS, UNKNOWN_ALLOW, UNKNOWN_DENY, map_names,
};

pub use self::{
    names::{NameEntries, NamesError},
    tables::{INGRESS_ID_BIT, IngressEntries, PolicyEntries, ingress_id},
};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "this pipeguard was built without its eBPF programs (AYA_BUILD_SKIP=1); rebuild with the eBPF toolchain (cargo xtask build)"
    )]
    NoObject,
    #[error("loading the eBPF object: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("the kernel rejected program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching {program} to cgroup {cgroup}: {source}")]
    Attach {
        program: &'static str,
        cgroup: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("opening cgroup {cgroup}: {source}")]
    OpenCgroup {
        cgroup: String,
        #[source]
        source: std::io::Error,
    },
    #[error("map {map} is missing from the eBPF object")]
    MissingMap { map: &'static str },
    #[error("pinned state is not what this version writes: {0}")]
    Corrupt(String),
    #[error("pin directory {dir}: {source}")]
    Pin {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Names(NamesError),
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// What a socket whose cgroup is in no pod entry gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum UnknownPods {
    Allow,
    Deny,
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub unknown_pods: UnknownPods,
    /// Per-destination packet and byte statistics (an LRU update per packet of the slow
    /// path, two atomic adds to the socket's record on the fast path).
    pub flow_stats: bool,
    /// Report allowed attempts too (one event per destination per second): `exec --learn`
    /// needs the process behind each destination. Never for the agent's stream.
    pub report_allowed: bool,
    /// Most verbose aya-log level the kernel side emits (1 error … 5 trace; 0 off).
    pub kernel_log_level: u8,
    /// Pin maps and links here so enforcement outlives the process (the agent); `None`
    /// ties everything to this process (exec).
    pub pin_dir: Option<std::path::PathBuf>,
    /// How long a UDP socket may answer a peer after the last datagram from it.
    pub reply_window: std::time::Duration,
    /// Names under this domain may always be queried by DNS-filtered pods (`--cluster-domain`).
    pub cluster_domain: String,
    /// Addresses learned from DNS answers live at least this long (`--dns-min-ttl`).
    pub dns_min_ttl: std::time::Duration,
    /// Report the queries whose names a job chooses freely (rate-limited DNS events with
    /// verdict `allow`), for the dns_tunnel detector: those a wildcard rule allows, and all
    /// queries of guarded pods that are not DNS-filtered. Loads the DNS programs.
    pub report_queries: bool,
    /// Name the addresses in the answers to queries of guarded pods that are not
    /// DNS-filtered (learned entries that allow nothing, `learned_names`), for learning.
    /// Loads the DNS programs.
    pub learn_names: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            // Mixed nodes: pods the agent does not know keep working.
            unknown_pods: UnknownPods::Allow,
            // Off for the agent's hot path; `exec` turns it on for its summary.
            flow_stats: false,
            // Violations only.
            report_allowed: false,
            // Warnings and errors only: the kernel side never logs per packet.
            kernel_log_level: 2,
            // Nothing outlives the process unless asked.
            pin_dir: None,
            // conntrack's UDP timeout.
            reply_window: std::time::Duration::from_nanos(REPLY_WINDOW_NS),
            // Kubernetes' default.
            cluster_domain: DEFAULT_CLUSTER_DOMAIN.into(),
            // Resolvers and CDNs hand out TTLs of seconds; a floor keeps a build's connections
            // from outliving the entry they were resolved under.
            dns_min_ttl: DEFAULT_DNS_MIN_TTL,
            // Only when a detector reads them.
            report_queries: false,
            learn_names: false,
        }
    }
}

pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
pub const DEFAULT_DNS_MIN_TTL: std::time::Duration = std::time::Duration::from_secs(30);

pub struct Engine {
    ebpf: Ebpf,
    /// Lowercase, no trailing dot; empty for none.
    cluster_domain: String,
    /// Kept alive so kernel log records keep flowing; drained by `drain_kernel_logs`.
    // aya-log speaks the `log` facade; tracing-subscriber bridges it into tracing.
    logger: Option<EbpfLogger<&'static dyn log::Log>>,
    /// Why AF_PACKET sockets cannot be refused here, if they cannot (see `packet_guard`).
    packet_guard_unavailable: Option<String>,
    pin_dir: Option<std::path::PathBuf>,
    /// The DNS programs are loaded and installed (see `ensure_dns`).
    dns_loaded: bool,
    /// Each pod's row in the counter array.
    slots: slots::CounterSlots,
}

impl Engine {
    /// Loads every program and creates the maps. Nothing is attached yet.
    pub fn load(config: &EngineConfig) -> Result<Self, EngineError> {
        let object = object::bytes().ok_or(EngineError::NoObject)?;
        let mut loader = EbpfLoader::new();
        loader.override_global(aya_log::LEVEL, &config.kernel_log_level, false);
        let pin_paths: Vec<(&'static str, std::path::PathBuf)> = match &config.pin_dir {
            Some(dir) => {
                pins::prepare(dir).map_err(|source| EngineError::Pin {
                    dir: dir.display().to_string(),
                    source,
                })?;
                map_names::ALL
                    .iter()
                    .map(|name| (*name, pins::maps_dir(dir).join(name)))
                    .collect()
            }
            None => Vec::new(),
        };
        // An existing pin is reused: state and counters carry over to this process.
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(object).map_err(EngineError::Load)?;
        // The loader holds the parsed kernel BTF; it is not needed past this point.
        drop(loader);
        if let Some(dir) = &config.pin_dir {
            match pins::remove_stale_maps(dir, &map_names::ALL) {
                Ok(removed) if !removed.is_empty() => {
                    tracing::info!(?removed, "unpinned the maps of older layouts")
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "could not unpin the maps of older layouts"),
            }
        }
        let logger = match EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            // The object has no log statements compiled in at this level; nothing to drain.
            Err(error) => {
                tracing::debug!(%error, "kernel-side logging unavailable");
                None
            }
        };
        attach::load_programs(&mut ebpf)?;
        let packet_guard_unavailable = attach::load_packet_guard(&mut ebpf).err();
        if let Some(reason) = &packet_guard_unavailable {
            tracing::warn!(%reason, "AF_PACKET sockets cannot be refused on this kernel; raw IP sockets still are");
        }
        let mut engine = Self {
            ebpf,
            cluster_domain: config.cluster_domain.trim_end_matches('.').to_ascii_lowercase(),
            logger,
            packet_guard_unavailable,
            pin_dir: config.pin_dir.clone(),
            dns_loaded: false,
            slots: slots::CounterSlots::adopt([]),
        };
        // Pods of a pinned pod table keep their rows (and their counts).
        engine.slots = slots::CounterSlots::adopt(
            engine
                .pod_entries()?
                .into_iter()
                .map(|(pod, entry)| (pod, entry.counter_slot)),
        );
        engine.write_config(config)?;
        // Pinned maps adopted from an earlier agent: nothing its sockets remember counts.
        engine.bump_generation()?;
        crate::memory::release_freed();
        Ok(engine)
    }

    /// Loads the DNS programs on first need: before any name is written or any pod is marked
    /// DNS-filtered, so a DNS-filtered pod never meets an empty tail-call slot (which would
    /// drop its queries, closed rather than open).
    pub(crate) fn ensure_dns(&mut self) -> Result<(), EngineError> {
        if !self.dns_loaded {
            attach::load_tail_calls(&mut self.ebpf)?;
            self.dns_loaded = true;
        }
        Ok(())
    }

    /// Attaches every program to the cgroup at `path` (and so to all its descendants).
    pub fn attach(&mut self, path: &Path) -> Result<(), EngineError> {
        let file = std::fs::File::open(path).map_err(|source| EngineError::OpenCgroup {
            cgroup: path.display().to_string(),
            source,
        })?;
        let cgroup_id = crate::cgroup::cgroup_id(path).map_err(|source| EngineError::OpenCgroup {
            cgroup: path.display().to_string(),
            source,
        })?;
        let pins = self.pin_dir.as_ref().map(|dir| attach::LinkPins {
            dir: dir.clone(),
            cgroup_id,
        });
        attach::attach_all(&mut self.ebpf, file.as_fd(), path, pins.as_ref())?;
        if self.packet_guard_unavailable.is_none() {
            attach::attach_packet_guard(&mut self.ebpf, file.as_fd(), path, pins.as_ref())?;
        }
        Ok(())
    }

    /// `None` when AF_PACKET sockets are refused in guarded pods; otherwise why not (the
    /// BPF LSM is not active on this kernel).
    pub fn packet_guard_unavailable(&self) -> Option<&str> {
        self.packet_guard_unavailable.as_deref()
    }

    /// Changes the UDP reply window at once, for replies already recorded too (the kernel
    /// compares the time of the last datagram against the current window).
    pub fn set_reply_window(&mut self, window: std::time::Duration) -> Result<(), EngineError> {
        let mut array: aya::maps::Array<_, Config> = self.map_mut(map_names::CONFIG)?;
        let map_error = |source| EngineError::Map {
            map: map_names::CONFIG,
            source,
        };
        let mut config = array.get(&0, 0).map_err(map_error)?;
        config.reply_window_ns = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        array.set(0, config, 0).map_err(map_error)
    }

    fn write_config(&mut self, config: &EngineConfig) -> Result<(), EngineError> {
        let value = Config {
            unknown_pods: match config.unknown_pods {
                UnknownPods::Allow => UNKNOWN_ALLOW,
                UnknownPods::Deny => UNKNOWN_DENY,
            },
            flags: if config.flow_stats { CONFIG_FLOW_STATS } else { 0 }
                | if config.report_allowed {
                    CONFIG_REPORT_ALLOWED
                } else {
                    0
                },
            reply_window_ns: u64::try_from(config.reply_window.as_nanos()).unwrap_or(u64::MAX),
        };
        let mut array: aya::maps::Array<_, Config> = self.map_mut(map_names::CONFIG)?;
        array.set(0, value, 0).map_err(|source| EngineError::Map {
            map: map_names::CONFIG,
            source,
        })?;
        if config.report_queries || config.learn_names {
            // Queries (and answers) of pods without domain rules are read too.
            self.ensure_dns()?;
        }
        let dns = DnsConfig {
            min_ttl_s: config.dns_min_ttl.as_secs().min(u64::from(u32::MAX)) as u32,
            flags: if config.report_queries {
                DNS_REPORT_QUERIES
            } else {
                0
            } | if config.learn_names { DNS_LEARN_NAMES } else { 0 },
        };
        let mut array: aya::maps::Array<_, DnsConfig> = self.map_mut(map_names::DNS_CONFIG)?;
        array.set(0, dns, 0).map_err(|source| EngineError::Map {
            map: map_names::DNS_CONFIG,
            source,
        })
    }

    /// Forwards pending kernel log records to tracing.
    pub fn drain_kernel_logs(&mut self) {
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
    }

    fn map_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T, EngineError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(EngineError::MissingMap { map: name })?;
        T::try_from(map).map_err(|source| EngineError::Map { map: name, source })
    }

    fn map<'a, T>(&'a self, name: &'static str) -> Result<T, EngineError>
    where
        T: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self.ebpf.map(name).ok_or(EngineError::MissingMap { map: name })?;
        T::try_from(map).map_err(|source| EngineError::Map { map: name, source })
    }

    /// Takes the ring buffer drop counter out of the engine, for the event pipeline.
    pub fn take_event_drops(
        &mut self,
    ) -> Result<aya::maps::PerCpuArray<aya::maps::MapData, u64>, EngineError> {
        let map = self
            .ebpf
            .take_map(map_names::EVENT_DROPS)
            .ok_or(EngineError::MissingMap {
                map: map_names::EVENT_DROPS,
            })?;
        aya::maps::PerCpuArray::try_from(map).map_err(|source| EngineError::Map {
            map: map_names::EVENT_DROPS,
            source,
        })
    }

    /// Takes the event ring buffer out of the engine, for a reader task.
    pub fn take_events(&mut self) -> Result<aya::maps::RingBuf<aya::maps::MapData>, EngineError> {
        let map = self
            .ebpf
            .take_map(map_names::EVENTS)
            .ok_or(EngineError::MissingMap {
                map: map_names::EVENTS,
            })?;
        aya::maps::RingBuf::try_from(map).map_err(|source| EngineError::Map {
            map: map_names::EVENTS,
            source,
        })
    }
}
