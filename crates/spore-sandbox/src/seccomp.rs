//! The seccomp filter installed in every sandbox, compiled with `seccompiler`.
//!
//! A deny-list: the runtime may use any system call except those that reach beyond the
//! sandbox (mounts, namespaces, kernel modules, kexec, ptrace, bpf, keyrings, clock and swap
//! control, ...) or that open kernel interfaces a function has no use for (io_uring, NUMA
//! placement, obsolete calls, socket families other than Unix, IP and netlink), following
//! what Docker's default profile refuses an unprivileged container. Denied calls fail with
//! `EPERM`; `clone3` fails with `ENOSYS` so that libc falls back to `clone`, whose namespace
//! flags a BPF filter can inspect (the filter cannot read `clone3`'s struct argument).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Errors compiling the filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler refused the rules or the target.
    #[error("Cannot build the seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    /// This CPU architecture has no filter yet.
    #[error("No seccomp filter for architecture {0}")]
    Arch(&'static str),
}

/// System calls denied outright, grouped by what they would reach.
pub const DENIED: &[(&str, i64)] = &[
    // The file system tree and namespaces: the sandbox's are set up once, by the init.
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("fsopen", libc::SYS_fsopen),
    ("fsmount", libc::SYS_fsmount),
    ("fsconfig", libc::SYS_fsconfig),
    ("fspick", libc::SYS_fspick),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("open_tree_attr", SYS_OPEN_TREE_ATTR),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("sethostname", libc::SYS_sethostname),
    ("setdomainname", libc::SYS_setdomainname),
    // Other processes: reading or changing their memory, descriptors or advice.
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("process_madvise", libc::SYS_process_madvise),
    ("pidfd_getfd", libc::SYS_pidfd_getfd),
    ("kcmp", libc::SYS_kcmp),
    // The kernel itself: modules, kexec, BPF, performance counters, the log, reboot.
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("syslog", libc::SYS_syslog),
    ("reboot", libc::SYS_reboot),
    ("lsm_get_self_attr", SYS_LSM_GET_SELF_ATTR),
    ("lsm_set_self_attr", SYS_LSM_SET_SELF_ATTR),
    ("lsm_list_modules", SYS_LSM_LIST_MODULES),
    // io_uring: a second system-call path whose operations this filter never sees, and
    // a large source of kernel bugs (Docker's profile refuses it since 2023).
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    // Keyrings, which are not namespaced.
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    // Host-wide state: swap, accounting, clocks, quotas.
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("acct", libc::SYS_acct),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("quotactl", libc::SYS_quotactl),
    ("quotactl_fd", libc::SYS_quotactl_fd),
    // Files by handle (escapes a bind mount) and file-system-wide watches.
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("fanotify_init", libc::SYS_fanotify_init),
    // Page faults served by user space: a way to stall the kernel mid-copy in exploits.
    // A lazy restore makes its userfaultfd in pid 1 before this filter is installed.
    ("userfaultfd", libc::SYS_userfaultfd),
    // NUMA placement, which Docker leaves to CAP_SYS_NICE (moving other processes' pages).
    ("mbind", libc::SYS_mbind),
    ("set_mempolicy", libc::SYS_set_mempolicy),
    ("get_mempolicy", libc::SYS_get_mempolicy),
    ("set_mempolicy_home_node", libc::SYS_set_mempolicy_home_node),
    ("migrate_pages", libc::SYS_migrate_pages),
    ("move_pages", libc::SYS_move_pages),
    ("vhangup", libc::SYS_vhangup),
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
    // x86 port I/O.
    #[cfg(target_arch = "x86_64")]
    ("iopl", libc::SYS_iopl),
    #[cfg(target_arch = "x86_64")]
    ("ioperm", libc::SYS_ioperm),
    // Obsolete x86-64 calls (most already return ENOSYS; uselib loads a.out libraries).
    #[cfg(target_arch = "x86_64")]
    ("uselib", libc::SYS_uselib),
    #[cfg(target_arch = "x86_64")]
    ("ustat", libc::SYS_ustat),
    #[cfg(target_arch = "x86_64")]
    ("sysfs", libc::SYS_sysfs),
    #[cfg(target_arch = "x86_64")]
    ("_sysctl", libc::SYS__sysctl),
    #[cfg(target_arch = "x86_64")]
    ("create_module", 174),
    #[cfg(target_arch = "x86_64")]
    ("get_kernel_syms", 177),
    #[cfg(target_arch = "x86_64")]
    ("query_module", 178),
    #[cfg(target_arch = "x86_64")]
    ("nfsservctl", libc::SYS_nfsservctl),
];

// Numbers the libc crate does not name yet (the same on every architecture: the table is
// shared from 424 on).
const SYS_LSM_GET_SELF_ATTR: i64 = 459;
const SYS_LSM_SET_SELF_ATTR: i64 = 460;
const SYS_LSM_LIST_MODULES: i64 = 461;
const SYS_OPEN_TREE_ATTR: i64 = 467;

/// Socket families a sandbox may open; `socket` with any other fails. Unix and IP sockets
/// are what functions use; netlink is how libc lists interfaces and addresses
/// (`getifaddrs`, `getaddrinfo` with `AI_ADDRCONFIG`, Node's `os.networkInterfaces`). The
/// sandbox's network namespace has only loopback and it has no capabilities, so the other
/// families (`AF_VSOCK` reaching the hypervisor, `AF_ALG` the kernel's crypto API, packet,
/// TIPC, RDS, ...) would give it kernel code to attack and nothing else; Docker's profile
/// refuses `AF_VSOCK` and `AF_ALG`.
pub const SOCKET_FAMILIES: &[libc::c_int] = &[
    libc::AF_UNIX,
    libc::AF_INET,
    libc::AF_INET6,
    libc::AF_NETLINK,
];

/// Personas `personality` accepts: the default (`PER_LINUX`) and `0xffffffff`, which only
/// reads the current one. Others change how the kernel treats the process (`READ_IMPLIES_EXEC`,
/// `ADDR_NO_RANDOMIZE`, 32-bit `uname`), which no function needs.
pub const PERSONAS: &[u32] = &[0, 0xffff_ffff];

/// `clone` flags denied inside the sandbox: every new-namespace flag.
const DENIED_CLONE_FLAGS: &[libc::c_int] = &[
    libc::CLONE_NEWNS,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWCGROUP,
];

fn arch() -> Result<TargetArch, SeccompError> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|_| SeccompError::Arch(std::env::consts::ARCH))
}

/// Calls a cfork template still needs (to give each child its own namespaces, mounts and
/// hostname); every child adds a filter that denies them.
pub const TEMPLATE_ALLOWED: &[&str] = &["unshare", "setns", "mount", "umount2", "sethostname"];

/// Which filter to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Function instances: the whole deny-list.
    Instance,
    /// cfork templates: the deny-list less [`TEMPLATE_ALLOWED`] and the `clone` flag rules.
    Template,
    /// A child forked from a template: what the template's filter, which the child inherits
    /// and cannot shed, still allows of the deny-list ([`TEMPLATE_ALLOWED`], the `clone` flag
    /// rules). The two stacked deny what an instance's filter denies, and the fork path
    /// loads a filter of a few instructions.
    TemplateChild,
}

/// The filters to install, in order: the deny-list (EPERM), then `clone3` -> ENOSYS.
pub fn filters() -> Result<Vec<BpfProgram>, SeccompError> {
    filters_for(Profile::Instance)
}

/// A rule matching when argument `arg` (32 bits, as the kernel reads an `int`) differs from
/// every value of `allowed`.
fn none_of(arg: u8, allowed: impl IntoIterator<Item = u32>) -> Result<SeccompRule, SeccompError> {
    let conditions = allowed
        .into_iter()
        .map(|v| {
            SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, v.into())
                .map_err(SeccompError::Build)
        })
        .collect::<Result<Vec<_>, _>>()?;
    SeccompRule::new(conditions).map_err(SeccompError::Build)
}

/// Whether the filter of `profile` denies the [`DENIED`] call `name`.
fn denies(profile: Profile, name: &str) -> bool {
    match profile {
        Profile::Instance => true,
        Profile::Template => !TEMPLATE_ALLOWED.contains(&name),
        Profile::TemplateChild => TEMPLATE_ALLOWED.contains(&name),
    }
}

/// The filters of a [`Profile`].
pub fn filters_for(profile: Profile) -> Result<Vec<BpfProgram>, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = DENIED
        .iter()
        .filter(|(name, _)| denies(profile, name))
        .map(|&(_, nr)| (nr, Vec::new()))
        .collect();
    if profile != Profile::TemplateChild {
        let families = SOCKET_FAMILIES.iter().map(|&f| f as u32);
        rules.insert(libc::SYS_socket, vec![none_of(0, families)?]);
        rules.insert(
            libc::SYS_personality,
            vec![none_of(0, PERSONAS.iter().copied())?],
        );
    }
    if profile != Profile::Template {
        let clone_rules = DENIED_CLONE_FLAGS
            .iter()
            .map(|&flag| {
                let flag = flag as u64;
                SeccompCondition::new(
                    0,
                    SeccompCmpArgLen::Qword,
                    SeccompCmpOp::MaskedEq(flag),
                    flag,
                )
                .and_then(|c| SeccompRule::new(vec![c]))
                .map_err(SeccompError::Build)
            })
            .collect::<Result<Vec<_>, _>>()?;
        rules.insert(libc::SYS_clone, clone_rules);
    }
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch()?,
    )
    .map_err(SeccompError::Build)?;
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch()?,
    )
    .map_err(SeccompError::Build)?;
    let mut deny: BpfProgram = deny.try_into().map_err(SeccompError::Build)?;
    deny_x32(&mut deny);
    if profile == Profile::TemplateChild {
        return Ok(vec![deny]);
    }
    Ok(vec![deny, clone3.try_into().map_err(SeccompError::Build)?])
}

/// Bit 30 of the system call number selects the x32 ABI on x86-64, whose calls the kernel
/// reports with the x86-64 audit architecture: a deny-list keyed on numbers would let
/// `nr | 0x40000000` through where the kernel has x32 enabled. Inserted right after
/// seccompiler's architecture check (3 instructions, which jumps over its kill to the
/// instruction after it), so every jump offset of the program stays valid.
fn deny_x32(program: &mut BpfProgram) {
    if !cfg!(target_arch = "x86_64") {
        return;
    }
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const NR_OFFSET: u32 = 0; // seccomp_data.nr
    const X32_BIT: u32 = 0x4000_0000;
    let insn = |code, jt, jf, k| seccompiler::sock_filter { code, jt, jf, k };
    let check = [
        insn(LD_W_ABS, 0, 0, NR_OFFSET),
        insn(JGE_K, 0, 1, X32_BIT),
        insn(RET_K, 0, 0, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
    ];
    program.splice(ARCH_CHECK_LEN..ARCH_CHECK_LEN, check);
}

/// Instructions of seccompiler's architecture check at the start of every program.
const ARCH_CHECK_LEN: usize = 3;

/// A program as the raw `struct sock_filter` array the kernel takes (8 bytes an
/// instruction, native byte order), for runtimes that install it themselves with
/// `prctl(PR_SET_SECCOMP)` (the cfork child, which is Python).
pub fn program_bytes(program: &BpfProgram) -> Vec<u8> {
    let mut out = Vec::with_capacity(program.len() * 8);
    for insn in program {
        out.extend_from_slice(&insn.code.to_ne_bytes());
        out.push(insn.jt);
        out.push(insn.jf);
        out.extend_from_slice(&insn.k.to_ne_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(profile: Profile) -> std::collections::BTreeSet<&'static str> {
        DENIED
            .iter()
            .map(|&(name, _)| name)
            .filter(|name| denies(profile, name))
            .collect()
    }

    #[test]
    fn filters_compile() {
        let f = filters().unwrap();
        assert_eq!(f.len(), 2);
        assert!(f[0].len() > DENIED.len());
        let child = filters_for(Profile::TemplateChild).unwrap();
        assert_eq!(child.len(), 1);
        assert!(
            child[0].len() < f[0].len() / 4,
            "the fork path loads a short filter"
        );
        let t = filters_for(Profile::Template).unwrap();
        assert!(t[0].len() < f[0].len(), "the template filter allows more");
        assert_eq!(program_bytes(&f[1]).len(), f[1].len() * 8);
        // seccompiler opens every program with its 3-instruction architecture check.
        for p in [&f[0], &t[0], &child[0], &f[1]] {
            assert_eq!(p[ARCH_CHECK_LEN - 1].k, libc::SECCOMP_RET_KILL_PROCESS);
        }
    }

    #[test]
    fn a_template_and_its_child_deny_together_what_an_instance_denies() {
        let template = names(Profile::Template);
        let child = names(Profile::TemplateChild);
        assert!(template.is_disjoint(&child));
        let both: std::collections::BTreeSet<_> = template.union(&child).copied().collect();
        assert_eq!(both, names(Profile::Instance));
        for name in TEMPLATE_ALLOWED {
            assert!(
                DENIED.iter().any(|(n, _)| n == name),
                "{name} is not denied"
            );
        }
    }

    /// What a process under `profiles` gets from a few calls, run in a forked child
    /// (a filter cannot be removed): one bit per call that did not behave.
    fn misbehaving_calls(profiles: &[Profile]) -> i32 {
        let programs: Vec<BpfProgram> = profiles
            .iter()
            .flat_map(|&p| filters_for(p).unwrap())
            .collect();
        // SAFETY: the child only makes system calls and exits, touching no lock or
        // allocation another thread of the test harness might hold.
        match unsafe { libc::fork() } {
            0 => {
                let errno = || std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
                let mut bad = 0;
                // SAFETY: prctl with integer arguments only.
                unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
                for p in &programs {
                    if seccompiler::apply_filter(p).is_err() {
                        // SAFETY: _exit never returns and runs no destructors.
                        unsafe { libc::_exit(100) };
                    }
                }
                let mut params = [0u8; 120];
                // SAFETY: io_uring_setup reads and writes a 120-byte io_uring_params.
                let rc = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1, params.as_mut_ptr()) };
                if rc != -1 || errno() != libc::EPERM {
                    bad |= 1;
                }
                // SAFETY: socket takes integers; any descriptor it returns stays open.
                let rc = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0) };
                if rc != -1 || errno() != libc::EPERM {
                    bad |= 2;
                }
                // SAFETY: as above.
                if unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) } < 0 {
                    bad |= 4;
                }
                // SAFETY: 0xffffffff only reads the persona.
                if unsafe { libc::personality(0xffff_ffff) } < 0 {
                    bad |= 8;
                }
                // SAFETY: PER_LINUX32 (denied, else it changes only this child's persona).
                let rc = unsafe { libc::personality(0x0008) };
                if rc != -1 || errno() != libc::EPERM {
                    bad |= 16;
                }
                if cfg!(target_arch = "x86_64") {
                    // SAFETY: getpid through the x32 ABI: no arguments.
                    let rc = unsafe { libc::syscall(0x4000_0000 | libc::SYS_getpid) };
                    if rc != -1 || errno() != libc::EPERM {
                        bad |= 32;
                    }
                }
                // SAFETY: as above.
                if unsafe { libc::syscall(libc::SYS_getpid) } <= 0 {
                    bad |= 64;
                }
                // SAFETY: _exit never returns and runs no destructors.
                unsafe { libc::_exit(bad) }
            }
            pid if pid > 0 => {
                let mut status = 0;
                // SAFETY: waits for our own child, writing its status into `status`.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                assert!(libc::WIFEXITED(status), "status {status:#x}");
                libc::WEXITSTATUS(status)
            }
            _ => panic!("fork: {}", std::io::Error::last_os_error()),
        }
    }

    #[test]
    fn io_uring_vsock_personas_and_x32_are_denied_and_the_rest_works() {
        assert_eq!(misbehaving_calls(&[Profile::Instance]), 0);
        assert_eq!(misbehaving_calls(&[Profile::Template]), 0);
        assert_eq!(
            misbehaving_calls(&[Profile::Template, Profile::TemplateChild]),
            0
        );
    }
}
