//! The command line: clap's definitions of every command, flag and help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Spore: a serverless function runtime with sandboxed, fast-starting instances.
#[derive(Debug, Parser)]
#[command(name = "spore", version, about, long_about = None, propagate_version = true)]
pub(crate) struct Cli {
    /// Daemon endpoint for client commands.
    #[arg(
        long,
        global = true,
        env = "SPORE_ENDPOINT",
        default_value = "http://127.0.0.1:9000"
    )]
    pub(crate) endpoint: String,
    /// Client commands sign their requests with this profile of the AWS credentials file
    /// (`AWS_SHARED_CREDENTIALS_FILE`, default ~/.aws/credentials). Without it: the
    /// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY variables, else the daemon's own
    /// <data-dir>/credentials when readable (SPORE_DATA_DIR, default /var/lib/spore as root).
    #[arg(long, global = true, env = "AWS_PROFILE")]
    pub(crate) profile: Option<String>,
    /// What client commands print: text (aligned tables) or json (the daemon's answers).
    #[arg(
        long,
        short = 'o',
        global = true,
        default_value = "text",
        value_parser = ["text", "json"]
    )]
    pub(crate) output: String,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the daemon: the HTTP API on --listen, sandboxes, registry under --data-dir.
    Serve(ServeArgs),
    /// Run a processing unit's shim: it dials the control plane (`spore serve --link-listen`)
    /// at --control, registers as unit --id, and runs the functions placed there.
    Shim(ShimArgs),
    /// The cluster's CA and join tokens (run on the control plane's host, with its data dir).
    Cluster {
        #[command(subcommand)]
        which: ClusterCommand,
    },
    /// List the processing units, their state, load and functions.
    Units,
    /// Deploy (create or update) a function from a folder with spore.toml and code.
    Deploy {
        /// Folder holding spore.toml.
        dir: PathBuf,
        /// Do not build dependencies from requirements.txt or package.json (the folder
        /// vendors its packages).
        #[arg(long)]
        no_build: bool,
    },
    /// Invoke a function and print its result.
    Invoke {
        /// Function name.
        name: String,
        /// Event JSON, or @FILE to read it from a file.
        #[arg(long, short, default_value = "{}")]
        payload: String,
        /// Serve from a fresh instance, bypassing the warm pool (to measure cold starts):
        /// `--cold` takes the function's default start, `--cold init|fork|restore` that one.
        #[arg(long, num_args = 0..=1, default_missing_value = "1", value_name = "HOW")]
        cold: Option<String>,
        /// Print the invocation's log block to stderr.
        #[arg(long)]
        log: bool,
        /// Print start kind and timings to stderr.
        #[arg(long, short)]
        verbose: bool,
    },
    /// List deployed functions.
    Ls,
    /// List what runs for functions: instances (idle and busy), cfork templates, spare
    /// sandboxes and idle DAG pipelines, with pids, start path, age and memory.
    Ps,
    /// Describe a function: configuration, what it holds, its snapshot, recent calls,
    /// processes and last log lines.
    Describe {
        /// Function name.
        name: String,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Delete a function (refused while a DAG uses it, unless --force).
    Rm {
        /// Function name.
        name: String,
        /// Delete it even though DAGs use it: they stay deployed and fail until the function
        /// is deployed again (their names are printed).
        #[arg(long)]
        force: bool,
    },
    /// Print a function's recent log lines.
    Logs {
        /// Function name.
        name: String,
        /// How many lines.
        #[arg(long, short = 'n', default_value_t = 100)]
        lines: usize,
        /// Keep printing new lines as they come (Ctrl-C stops).
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only lines of the last DURATION (30s, 10m, 2h, 1d).
        #[arg(long, value_name = "DURATION")]
        since: Option<String>,
        /// Only lines of this invocation.
        #[arg(long, value_name = "ID")]
        request_id: Option<String>,
    },
    /// Stop a function's idle instances and cfork template now, releasing their memory (the
    /// next start restores from its snapshot, if it has one).
    Evict {
        /// Function name.
        name: String,
    },
    /// List, inspect and remove snapshots of warm runtimes.
    Snapshot {
        #[command(subcommand)]
        which: SnapshotCommand,
    },
    /// Deploy, list, remove and invoke function DAGs.
    Dag {
        #[command(subcommand)]
        which: DagCommand,
    },
    /// Run the demo: start a daemon, deploy the sample functions, invoke them cold and warm,
    /// print the figures.
    Demo(DemoArgs),
    /// Run a benchmark; results go to --out as CSV, JSON, Markdown and PNG.
    Bench {
        /// Measure the daemon at --endpoint instead of starting one for the run (its
        /// functions named like the samples are replaced).
        #[arg(long, global = true)]
        use_running_daemon: bool,
        #[command(subcommand)]
        which: BenchCommand,
    },
    /// Open the web dashboard: prints a one-time login URL (valid five minutes, for one
    /// login) and, with --open, opens it in the default browser.
    Ui {
        /// Open the URL with xdg-open.
        #[arg(long)]
        open: bool,
        /// Print the URL alone (what `spore ui` prints anyway), without the note on stderr.
        #[arg(long)]
        print_url: bool,
    },
    /// Create, list and remove the daemon's access keys (requests are signed with AWS
    /// Signature Version 4; the daemon makes an admin key in <data-dir>/credentials).
    Keys {
        #[command(subcommand)]
        which: KeysCommand,
    },
    /// (internal) The sandbox init, run by the daemon.
    #[command(name = "__sandbox-init", hide = true)]
    SandboxInit,
}

#[derive(Debug, Subcommand)]
pub(crate) enum KeysCommand {
    /// Make an access key and print it (the only time its secret is shown), as AWS
    /// credentials-file lines.
    Create {
        /// The key's name.
        name: String,
        /// It may invoke functions and nothing else.
        #[arg(long)]
        invoke_only: bool,
        /// (With --invoke-only) the functions it may invoke: a glob with * and ?.
        #[arg(long, value_name = "GLOB")]
        functions: Option<String>,
    },
    /// List the access keys (without secrets).
    Ls,
    /// Remove an access key (requests signed with it are refused from then on).
    Rm {
        /// The key's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ClusterCommand {
    /// Make the cluster CA in the data dir (if it has none) and print its fingerprint. `spore
    /// serve --link-listen` makes it too on its first start.
    Init {
        /// The control plane's data dir (default as `spore serve`).
        #[arg(long, env = "SPORE_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Print a join token for `spore shim --join` (it also pins the CA); or list or revoke
    /// tokens.
    Token {
        /// How long the token works (s, m, h, d).
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: std::time::Duration,
        /// The first join uses it up.
        #[arg(long)]
        once: bool,
        /// Only this unit may join with it.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=65535))]
        unit: Option<u32>,
        /// List the tokens still valid (ids and expiries; secrets are not kept).
        #[arg(long, conflicts_with_all = ["revoke", "once", "unit"])]
        list: bool,
        /// Revoke a token by its id (the second field of the token).
        #[arg(long, value_name = "ID", conflicts_with_all = ["once", "unit"])]
        revoke: Option<String>,
        /// The control plane's data dir (default as `spore serve`).
        #[arg(long, env = "SPORE_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
}

/// A duration: a number with `s`, `m`, `h` or `d` (seconds without).
/// `--region`: an AWS-shaped region name (`eu-west-1`, `local`).
pub(crate) fn parse_region(s: &str) -> Result<String, String> {
    let ok = (1..=32).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    ok.then(|| s.to_owned()).ok_or_else(|| {
        format!("region {s:?} must be 1 to 32 lower-case letters, digits and inner '-'")
    })
}

/// `--account-id`: twelve digits, as AWS account ids are.
pub(crate) fn parse_account_id(s: &str) -> Result<String, String> {
    (s.len() == 12 && s.chars().all(|c| c.is_ascii_digit()))
        .then(|| s.to_owned())
        .ok_or_else(|| format!("account id {s:?} must be 12 digits"))
}

pub(crate) fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and s, m, h or d (90s, 10m, 24h, 7d)"))?;
    let per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit is s, m, h or d")),
    };
    Ok(std::time::Duration::from_secs(n.saturating_mul(per)))
}

#[derive(Debug, Subcommand)]
pub(crate) enum SnapshotCommand {
    /// List stored snapshots.
    Ls,
    /// Describe a snapshot: regions, page counts, partitions (a function name or an image
    /// file).
    Inspect {
        /// Function name or image path.
        target: PathBuf,
    },
    /// Remove a function's snapshots (the next init takes a new one).
    Rm {
        /// Function name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum DagCommand {
    /// Deploy (create or replace) a DAG from its TOML file; its functions must exist.
    Deploy {
        /// The DAG file.
        file: PathBuf,
    },
    /// Invoke a DAG and print the sink's output.
    Invoke {
        /// DAG name.
        name: String,
        /// Input event JSON, or @FILE to read it from a file.
        #[arg(long, short, default_value = "{}")]
        payload: String,
        /// shm or http (the baseline); default: the DAG's own.
        #[arg(long)]
        transport: Option<String>,
        /// Print per-node timings to stderr.
        #[arg(long)]
        timing: bool,
    },
    /// List deployed DAGs.
    Ls,
    /// Remove a DAG (its functions stay).
    Rm {
        /// DAG name.
        name: String,
    },
}

#[derive(Debug, Args)]
pub(crate) struct ShimArgs {
    /// This unit's id (1-65535; 0 is the control plane's own unit).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=65535))]
    pub(crate) id: u32,
    /// The control plane's link address, HOST:PORT (what `spore serve --link-listen` bound;
    /// also in its <data-dir>/run/link-endpoint). Without it, the shim finds the control
    /// plane in etcd (--etcd).
    #[arg(long, required_unless_present = "etcd")]
    pub(crate) control: Option<String>,
    /// A join token (`spore cluster token` on the control plane's host): the first start
    /// presents it once to get this unit's certificate (kept in <data-dir>/cluster), later
    /// starts need only the certificate. The token pins the cluster CA: the shim talks to no
    /// control plane of another CA, whatever address it was given or found in etcd.
    #[arg(
        long,
        env = "SPORE_JOIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub(crate) join: Option<String>,
    /// The instruction set this unit declares (default: this host's).
    #[arg(long)]
    pub(crate) arch: Option<String>,
    /// An accelerator this unit declares (repeat for several; default: `gpu` if an NVIDIA
    /// device is present). `--accelerator none` declares none.
    #[arg(long)]
    pub(crate) accelerator: Vec<String>,
    #[command(flatten)]
    pub(crate) serve: ServeArgs,
}

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// A TOML file of these options (`max_instances = 16`, `listen = "127.0.0.1:9000"`, ...;
    /// default /etc/spore/spore.toml when it exists). Flags win over environment variables,
    /// which win over the file, which wins over the defaults.
    #[arg(long, env = "SPORE_CONFIG", value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Address of the HTTP API (port 0 picks a free one; the address is written to
    /// <data-dir>/run/endpoint). Default 127.0.0.1:9000; for a shim 127.0.0.1:0 (its API
    /// shows its own unit).
    #[arg(long, env = "SPORE_LISTEN")]
    pub(crate) listen: Option<String>,
    /// `spore serve`: where to accept shims' links, HOST:PORT (port 0 picks a free one,
    /// written to <data-dir>/run/link-endpoint); without it, this daemon is the only unit.
    /// `spore shim`: where to accept neighbour links from other shims (an address they
    /// reach; it is announced to the control plane), so that DAG edges between two shims go
    /// straight between them; without it, such edges pass through the control plane.
    #[arg(long, env = "SPORE_LINK_LISTEN")]
    pub(crate) link_listen: Option<String>,
    /// etcd endpoints (http://HOST:PORT[,...]) for membership across hosts: the control plane
    /// announces its link address and placements there; a shim registers itself there and
    /// finds the control plane there.
    #[arg(long, env = "SPORE_ETCD")]
    pub(crate) etcd: Option<String>,
    /// Key prefix in etcd (one per cluster).
    #[arg(long, env = "SPORE_ETCD_PREFIX", default_value = "/spore")]
    pub(crate) etcd_prefix: String,
    /// The CA certificate (PEM) etcd's server certificate chains to (https endpoints;
    /// default: the system's roots).
    #[arg(long, env = "SPORE_ETCD_CA", value_name = "FILE")]
    pub(crate) etcd_ca: Option<PathBuf>,
    /// A client certificate (PEM) for etcd's --client-cert-auth (with --etcd-key).
    #[arg(
        long,
        env = "SPORE_ETCD_CERT",
        value_name = "FILE",
        requires = "etcd_key"
    )]
    pub(crate) etcd_cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(
        long,
        env = "SPORE_ETCD_KEY",
        value_name = "FILE",
        requires = "etcd_cert"
    )]
    pub(crate) etcd_key: Option<PathBuf>,
    /// An etcd user (etcd's auth); its password comes from SPORE_ETCD_PASSWORD or
    /// --etcd-password-file, never from the command line.
    #[arg(long, env = "SPORE_ETCD_USER", value_name = "NAME")]
    pub(crate) etcd_user: Option<String>,
    /// A file holding the etcd user's password (its first line).
    #[arg(
        long,
        env = "SPORE_ETCD_PASSWORD_FILE",
        value_name = "FILE",
        requires = "etcd_user"
    )]
    pub(crate) etcd_password_file: Option<PathBuf>,
    /// `spore serve --link-listen`: how long a unit may stay down before it is forgotten
    /// (dropped from `spore units`; s, m, h, d).
    #[arg(long, env = "SPORE_UNIT_GRACE", default_value = "10m", value_parser = parse_duration)]
    pub(crate) unit_grace: std::time::Duration,
    /// Data dir (default /var/lib/spore as root, else ~/.local/share/spore; a shim's default
    /// is unit-N under it).
    #[arg(long, env = "SPORE_DATA_DIR")]
    pub(crate) data_dir: Option<PathBuf>,
    /// Shared Python packages, bound read-only into sandboxes (default <data-dir>/packages).
    #[arg(long, env = "SPORE_PACKAGES_DIR")]
    pub(crate) packages_dir: Option<PathBuf>,
    /// Offline package index for dependency builds: wheels for pip (`--no-index
    /// --find-links`) and an npm cache in its `npm/` folder (`npm ci --offline`), bound
    /// read-only into build sandboxes. Without it builds use the host's network.
    #[arg(long, env = "SPORE_BUILD_INDEX_DIR")]
    pub(crate) build_index_dir: Option<PathBuf>,
    /// Longest a dependency build may run, seconds.
    #[arg(long, env = "SPORE_BUILD_TIMEOUT_S", default_value_t = 300)]
    pub(crate) build_timeout_s: u64,
    /// Largest installed dependency layer, MiB.
    #[arg(long, env = "SPORE_BUILD_MAX_MB", default_value_t = 250)]
    pub(crate) build_max_mb: u32,
    /// Default most instances per function.
    #[arg(long, env = "SPORE_MAX_INSTANCES", default_value_t = 8)]
    pub(crate) max_instances: u32,
    /// Seconds an idle instance is kept warm.
    #[arg(long, env = "SPORE_KEEP_ALIVE_S", default_value_t = 300)]
    pub(crate) keep_alive_s: u64,
    /// CPU quota per instance, in thousandths of a CPU.
    #[arg(long, env = "SPORE_CPU_MILLIS", default_value_t = 1000)]
    pub(crate) cpu_millis: u32,
    /// Most processes per instance.
    #[arg(long, env = "SPORE_PIDS_MAX", default_value_t = 64)]
    pub(crate) pids_max: u32,
    /// Size of each instance's /tmp, MiB.
    #[arg(long, env = "SPORE_TMP_MB", default_value_t = 64)]
    pub(crate) tmp_mb: u32,
    /// The region named in every ARN the API returns (lower-case letters, digits, '-').
    #[arg(long, env = "SPORE_REGION", default_value = spore_control::DEFAULT_REGION, value_parser = parse_region)]
    pub(crate) region: String,
    /// The account id named in every ARN the API returns (12 digits).
    #[arg(long, env = "SPORE_ACCOUNT_ID", default_value = spore_control::DEFAULT_ACCOUNT_ID, value_parser = parse_account_id)]
    pub(crate) account_id: String,
    /// Most memory idle instances may hold together, MiB: over it, idle instances are
    /// stopped (those restorable from a snapshot first, then the longest idle).
    #[arg(long, env = "SPORE_IDLE_MEMORY_MB")]
    pub(crate) idle_memory_mb: Option<u64>,
    /// How restores install memory: full (all pages first), lazy (on first touch, via
    /// userfaultfd) or reap (a recorded working set first, the rest lazily).
    #[arg(long, env = "SPORE_SNAPSHOT_MODE", default_value = "full")]
    pub(crate) snapshot_mode: String,
    /// How snapshot images store pages: raw, lz4, zstd-N.
    #[arg(long, env = "SPORE_SNAPSHOT_CODEC", default_value = "raw")]
    pub(crate) snapshot_codec: String,
    /// Network access of functions whose manifest does not set `network`: `egress`
    /// (outbound connections through NAT, never to the host, link-local addresses or other
    /// sandboxes; as on Lambda) or `none` (loopback only).
    #[arg(long, env = "SPORE_DEFAULT_NETWORK", default_value = "egress", value_parser = ["egress", "none"])]
    pub(crate) default_network: String,
    /// Private IPv4 subnet egress sandboxes get addresses from (refused if it overlaps a host
    /// route); default: the first free /21 of 10.214.0.0/16.
    #[arg(long, env = "SPORE_EGRESS_SUBNET")]
    pub(crate) egress_subnet: Option<String>,
    /// Seconds to let in-flight invocations finish on shutdown.
    #[arg(long, env = "SPORE_GRACE_S", default_value_t = 30)]
    pub(crate) grace_s: u64,
    /// Who may call the API: `keys` (every request but /healthz signed with AWS Signature
    /// Version 4 by one of the daemon's access keys) or `none` (no checks: only for a
    /// throwaway daemon on a loopback --listen).
    #[arg(long, env = "SPORE_AUTH", default_value = "keys", value_parser = ["keys", "none"])]
    pub(crate) auth: String,
    /// Also serve /metrics (and /healthz) without authentication on this address, for a
    /// Prometheus scraper (the API's own /metrics needs an admin key).
    #[arg(long, env = "SPORE_METRICS_LISTEN", value_name = "HOST:PORT")]
    pub(crate) metrics_listen: Option<String>,
    /// Write the API's address to this file once the daemon listens (removed at shutdown),
    /// for scripts and service managers that wait for it.
    #[arg(long, env = "SPORE_READY_FILE", value_name = "PATH")]
    pub(crate) ready_file: Option<PathBuf>,
    /// The daemon's own log on stderr: text (colours only on a terminal, never with
    /// NO_COLOR) or json (one object a line). RUST_LOG filters it (default info).
    #[arg(long, env = "SPORE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub(crate) log_format: String,
}

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Folder of sample functions.
    #[arg(long, default_value = "functions")]
    pub(crate) functions: PathBuf,
    /// Warm invocations per function.
    #[arg(long, default_value_t = 20)]
    pub(crate) warm: usize,
    /// Cold invocations per function.
    #[arg(long, default_value_t = 5)]
    pub(crate) cold: usize,
    /// Deploy into the daemon at --endpoint instead of starting one for the demo (its
    /// functions named like the samples are replaced).
    #[arg(long)]
    pub(crate) use_running_daemon: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Fresh-instance start of `hello`: container (and cfork) vs warm vs `python3 -c pass`.
    ColdStart {
        /// Sandbox kind to measure: container, or cfork (then container is the baseline).
        #[arg(long, default_value = "container")]
        sandbox: String,
        /// Samples per series.
        #[arg(long, short = 'n', default_value_t = 100)]
        n: usize,
        /// With cfork, also a series of starts this many milliseconds apart (as isolated cold
        /// starts arrive: the previous start's follow-up work is done); 0 leaves it out.
        /// Default 50; refused with `--sandbox container`, which has no such series.
        #[arg(long)]
        gap_ms: Option<u64>,
        /// Where results go.
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
        /// Folder of sample functions (hello is deployed from here).
        #[arg(long, default_value = "functions")]
        functions: PathBuf,
    },
    /// Every sample function on a fresh instance: container vs cfork (Molecule Fig. 14).
    Functionbench {
        /// Samples per function and mode.
        #[arg(long, short = 'n', default_value_t = 20)]
        n: usize,
        /// Where results go.
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
        /// Folder of sample functions.
        #[arg(long, default_value = "functions")]
        functions: PathBuf,
    },
    /// The shared-memory data plane alone: ring hop latency vs a Unix socketpair, sealed memfd
    /// hand-off vs memcpy (no daemon needed).
    Ipc {
        /// Round trips per series.
        #[arg(long, short = 'n', default_value_t = 20000)]
        n: usize,
        /// Microseconds the ring polls before sleeping on its doorbell, for the spinning series.
        #[arg(long, default_value_t = 50)]
        spin_us: u64,
        /// Where results go.
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
    },
    /// Function DAGs over shared memory vs HTTP through the gateway: hop latency (1 KiB),
    /// payload sweep against memcpy, end-to-end latency of each workload.
    Dag {
        /// Invocations per workload and transport.
        #[arg(long, short = 'n', default_value_t = 50)]
        n: usize,
        /// Where results go.
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
        /// Folder of the DAG functions and DAG files.
        #[arg(long, default_value = "functions/dag")]
        functions: PathBuf,
    },
    /// Memory restore alone (Sabre Fig. 9): images of sample functions' runtimes restored
    /// into fresh memory as a plain memory file, with zero pages elided, and per codec, with
    /// 1 and 2 threads, page cache warm and dropped.
    MemoryRestore {
        /// Restores per series.
        #[arg(long, short = 'n', default_value_t = 20)]
        n: usize,
        /// Sample functions whose images are restored (folder names under --functions).
        #[arg(long, default_value = "hello,linpack,image_processing")]
        only: String,
        /// Codecs besides the raw image.
        #[arg(long, default_value = "lz4,zstd-1,zstd-3")]
        codecs: String,
        /// Install threads to compare.
        #[arg(long, default_value = "1,2")]
        threads: String,
        /// Skip the series with the page cache dropped before each restore.
        #[arg(long)]
        warm_cache_only: bool,
        /// Where results go.
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
        /// Folder of sample functions.
        #[arg(long, default_value = "functions")]
        functions: PathBuf,
    },
    /// Snapshots (Sabre Table 2 / Figs. 9, 11-12): image sizes raw, zero-elided and per
    /// codec, and cold start to first response from an init vs a restore from each codec,
    /// page cache warm and dropped.
    SnapshotColdStart {
        /// Starts per series.
        #[arg(long, short = 'n', default_value_t = 20)]
        n: usize,
        /// Sample functions to measure (folder names under --functions).
        #[arg(
            long,
            default_value = "hello,json_dumps_loads,pyaes,linpack,image_processing"
        )]
        only: String,
        /// Codecs to restore from.
        #[arg(long, default_value = "raw,lz4,zstd-1,zstd-3")]
        codecs: String,
        /// Skip the series with the page cache dropped before each start.
        #[arg(long)]
        warm_cache_only: bool,
        /// Where results go.
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
        /// Folder of sample functions.
        #[arg(long, default_value = "functions")]
        functions: PathBuf,
    },
    /// Two processing units (a shim in its own network namespace, linked over veth; needs
    /// root): cfork and calls local vs cross-unit, DAG hop shm vs link vs http, the link's
    /// payload sweep vs TCP, and DAG workloads spread over both units.
    Xpu {
        /// Samples per series.
        #[arg(long, short = 'n', default_value_t = 100)]
        n: usize,
        /// Where results go.
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
        /// Folder of sample functions (hello, and the DAG functions under dag/).
        #[arg(long, default_value = "functions")]
        functions: PathBuf,
    },
    /// Simultaneous first requests to a cfork function (each on a fresh instance), against
    /// the CPUs' floor: N forks spread over every core.
    Burst {
        /// Requests per burst, comma-separated.
        #[arg(long, default_value = "16,64,256")]
        sizes: String,
        /// Where results go.
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
        /// Folder of sample functions (hello is deployed from here).
        #[arg(long, default_value = "functions")]
        functions: PathBuf,
    },
    /// A new instance's first call (forked, restored) against a warm call of the same
    /// function, with automatic warm-up on and off, no `warmup_event`.
    FirstCall {
        /// New instances per series (and as many warm calls).
        #[arg(long, short = 'n', default_value_t = 20)]
        n: usize,
        /// Sample functions to measure (folder names under --functions).
        #[arg(long, default_value = "linpack,pyaes,image_processing")]
        only: String,
        /// Where results go.
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
        /// Folder of sample functions.
        #[arg(long, default_value = "functions")]
        functions: PathBuf,
    },
    /// Warm invocations at fixed numbers of concurrent clients (req/s, latency), against the
    /// floor: the same clients on the gateway's /healthz.
    Throughput {
        /// Concurrent clients per level, comma-separated.
        #[arg(long, default_value = "1,8,32")]
        clients: String,
        /// Measured seconds per level (after a second of warm-up).
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Where results go.
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
        /// Folder of sample functions (hello is deployed from here).
        #[arg(long, default_value = "functions")]
        functions: PathBuf,
    },
    /// Memory per idle instance (cfork, with containers as the baseline).
    Density {
        /// Idle cfork instances to start.
        #[arg(long, short = 'n', default_value_t = 500)]
        n: usize,
        /// Idle container instances to start (the baseline; 0 skips it).
        #[arg(long, default_value_t = 100)]
        container_n: usize,
        /// Where results go.
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
        /// Folder of sample functions (hello is deployed from here).
        #[arg(long, default_value = "functions")]
        functions: PathBuf,
    },
}

impl BenchCommand {
    /// The same command with its `--functions` folder resolved by `resolve`.
    pub(crate) fn with_samples(mut self, resolve: impl Fn(PathBuf) -> PathBuf) -> BenchCommand {
        let f = match &mut self {
            BenchCommand::ColdStart { functions, .. }
            | BenchCommand::Functionbench { functions, .. }
            | BenchCommand::Dag { functions, .. }
            | BenchCommand::Xpu { functions, .. }
            | BenchCommand::MemoryRestore { functions, .. }
            | BenchCommand::SnapshotColdStart { functions, .. }
            | BenchCommand::Density { functions, .. }
            | BenchCommand::Burst { functions, .. }
            | BenchCommand::FirstCall { functions, .. }
            | BenchCommand::Throughput { functions, .. } => Some(functions),
            BenchCommand::Ipc { .. } => None,
        };
        if let Some(f) = f {
            *f = resolve(std::mem::take(f));
        }
        self
    }
}
