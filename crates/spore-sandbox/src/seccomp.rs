//! The seccomp filter installed in every sandbox, compiled with `seccompiler`.
//!
//! A deny-list: the runtime may use any system call except those that reach beyond the
//! sandbox (mounts, namespaces, kernel modules, kexec, ptrace, bpf, keyrings, clock and swap
//! control, ...). Denied calls fail with `EPERM`; `clone3` fails with `ENOSYS` so that libc falls
//! back to `clone`, whose namespace flags a BPF filter can inspect (the filter cannot read
//! `clone3`'s struct argument).

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

/// System calls denied outright.
pub const DENIED: &[(&str, i64)] = &[
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("reboot", libc::SYS_reboot),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("acct", libc::SYS_acct),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("syslog", libc::SYS_syslog),
    ("quotactl", libc::SYS_quotactl),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("fsopen", libc::SYS_fsopen),
    ("fsmount", libc::SYS_fsmount),
    ("fsconfig", libc::SYS_fsconfig),
    ("fspick", libc::SYS_fspick),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("vhangup", libc::SYS_vhangup),
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
    #[cfg(target_arch = "x86_64")]
    ("iopl", libc::SYS_iopl),
    #[cfg(target_arch = "x86_64")]
    ("ioperm", libc::SYS_ioperm),
];

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

/// Calls a cfork template still needs (to give each child its own namespaces and mounts);
/// every child installs the full filter, which denies them.
pub const TEMPLATE_ALLOWED: &[&str] = &["unshare", "setns", "mount", "umount2"];

/// Which filter to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Function instances: the whole deny-list.
    Instance,
    /// cfork templates: the deny-list less [`TEMPLATE_ALLOWED`] and the `clone` flag rules.
    Template,
    /// A child forked from a template: the whole deny-list only, since the `clone3` filter is
    /// inherited from the template (one `prctl` fewer on the fork path).
    TemplateChild,
}

/// The filters to install, in order: the deny-list (EPERM), then `clone3` -> ENOSYS.
pub fn filters() -> Result<Vec<BpfProgram>, SeccompError> {
    filters_for(Profile::Instance)
}

/// The filters of a [`Profile`].
pub fn filters_for(profile: Profile) -> Result<Vec<BpfProgram>, SeccompError> {
    let template = profile == Profile::Template;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = DENIED
        .iter()
        .filter(|(name, _)| !(template && TEMPLATE_ALLOWED.contains(name)))
        .map(|&(_, nr)| (nr, Vec::new()))
        .collect();
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
    if !template {
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
    let mut out = Vec::new();
    let programs = if profile == Profile::TemplateChild {
        vec![deny]
    } else {
        vec![deny, clone3]
    };
    for f in programs {
        out.push(f.try_into().map_err(SeccompError::Build)?);
    }
    Ok(out)
}

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

    #[test]
    fn filters_compile() {
        let f = filters().unwrap();
        assert_eq!(f.len(), 2);
        assert!(f[0].len() > DENIED.len());
        assert_eq!(filters_for(Profile::TemplateChild).unwrap().len(), 1);
        let t = filters_for(Profile::Template).unwrap();
        assert!(t[0].len() < f[0].len(), "the template filter allows more");
        assert_eq!(program_bytes(&f[1]).len(), f[1].len() * 8);
    }
}
