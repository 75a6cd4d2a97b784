//! Per-vCPU CPUID: what KVM supports (KVM_GET_SUPPORTED_CPUID), with this
//! vCPU's APIC id and topology, the hypervisor bit, and a CPU template applied.
//!
//! Topology: every vCPU is one core of one package, one thread per core (leaf
//! 0x1 logical count, leaf 0x4 cores per package, leaves 0xB/0x1F levels,
//! AMD leaf 0x8000_001E).
//!
//! Templates:
//! - `minimal` (the default) hides what a nested host's instruction emulator
//!   cannot execute in guest kernel mode, and what a microVM has no use for:
//!   CMPXCHG16B, POPCNT, XSAVE/OSXSAVE (and leaf 0xD), AVX, AVX2, AVX-512, AMX,
//!   FMA, F16C, TSX (HLE, RTM), MPX, PKU, the PMU (leaf 0xA, PDCM), processor
//!   trace (leaf 0x14), and monitoring/VMX/SMX bits. Linux kernels run there
//!   (../shared/HOST-KVM.md: plain passthrough stops on `cmpxchg16b` and
//!   `xrstor`); on ordinary KVM hosts it costs vector extensions only.
//! - `passthrough` exposes everything KVM supports (topology and hypervisor bit
//!   still set): for hosts with hardware virtualization.
//!
//! Measured on the project's nested PVM hosts: a guest's CPUID shows the host's
//! own value for every feature bit KVM_GET_SUPPORTED_CPUID does not list (there
//! it lists few: XSAVE, AVX, AVX2, FMA and F16C are not listed, yet the guest
//! sees them set), so a template can only hide what KVM reports (CMPXCHG16B is
//! hidden). A Linux guest there needs `noxsave` on its command line. On
//! ordinary KVM the table set here is what the guest sees.

use std::fmt;
use std::str::FromStr;

use kvm_bindings::{CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, kvm_cpuid_entry2};

/// Which CPU features a guest sees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuTemplate {
    /// Hide what nested hosts cannot run and what a microVM does not need.
    #[default]
    Minimal,
    /// Everything KVM supports.
    Passthrough,
}

impl FromStr for CpuTemplate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "minimal" => Ok(CpuTemplate::Minimal),
            "passthrough" => Ok(CpuTemplate::Passthrough),
            other => Err(format!(
                "unknown CPU template '{other}' (expected minimal or passthrough)"
            )),
        }
    }
}

impl fmt::Display for CpuTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CpuTemplate::Minimal => "minimal",
            CpuTemplate::Passthrough => "passthrough",
        })
    }
}

// Leaf 0x1 ECX.
const ECX_DTES64: u32 = 1 << 2;
const ECX_MONITOR: u32 = 1 << 3;
const ECX_DS_CPL: u32 = 1 << 4;
const ECX_VMX: u32 = 1 << 5;
const ECX_SMX: u32 = 1 << 6;
const ECX_EST: u32 = 1 << 7;
const ECX_TM2: u32 = 1 << 8;
const ECX_FMA: u32 = 1 << 12;
const ECX_CX16: u32 = 1 << 13;
const ECX_PDCM: u32 = 1 << 15;
const ECX_POPCNT: u32 = 1 << 23;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_AVX: u32 = 1 << 28;
const ECX_F16C: u32 = 1 << 29;
const ECX_HYPERVISOR: u32 = 1 << 31;
// Leaf 0x1 EDX.
const EDX_HTT: u32 = 1 << 28;

/// Leaf 0x1 ECX bits the minimal template clears.
const MINIMAL_CLEAR_1_ECX: u32 = ECX_DTES64
    | ECX_MONITOR
    | ECX_DS_CPL
    | ECX_VMX
    | ECX_SMX
    | ECX_EST
    | ECX_TM2
    | ECX_FMA
    | ECX_CX16
    | ECX_PDCM
    | ECX_POPCNT
    | ECX_XSAVE
    | ECX_OSXSAVE
    | ECX_AVX
    | ECX_F16C;
/// Leaf 0x7.0 EBX: HLE, AVX2, RTM, PQM, MPX, PQE, AVX-512 F/DQ/IFMA/PF/ER/CD/BW/VL, PT.
const MINIMAL_CLEAR_7_EBX: u32 = (1 << 4)
    | (1 << 5)
    | (1 << 11)
    | (1 << 12)
    | (1 << 14)
    | (1 << 15)
    | (1 << 16)
    | (1 << 17)
    | (1 << 21)
    | (1 << 25)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28)
    | (1 << 30)
    | (1 << 31);
/// Leaf 0x7.0 ECX: AVX512_VBMI, PKU, OSPKE, WAITPKG, AVX512_VBMI2, VAES,
/// VPCLMULQDQ, AVX512_VNNI, AVX512_BITALG, AVX512_VPOPCNTDQ.
const MINIMAL_CLEAR_7_ECX: u32 = (1 << 1)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 9)
    | (1 << 10)
    | (1 << 11)
    | (1 << 12)
    | (1 << 14);
/// Leaf 0x7.0 EDX: AVX512_4VNNIW, AVX512_4FMAPS, AVX512_VP2INTERSECT, TSXLDTRK,
/// AMX_BF16, AVX512_FP16, AMX_TILE, AMX_INT8.
const MINIMAL_CLEAR_7_EDX: u32 =
    (1 << 2) | (1 << 3) | (1 << 8) | (1 << 16) | (1 << 22) | (1 << 23) | (1 << 24) | (1 << 25);
/// Leaf 0x7.1 EAX: AVX_VNNI, AVX512_BF16, AMX_FP16, AVX_IFMA.
const MINIMAL_CLEAR_7_1_EAX: u32 = (1 << 4) | (1 << 5) | (1 << 21) | (1 << 23);
/// Leaf 0x8000_0001 ECX: SSE4A misaligned/XOP/FMA4/TBM, PerfCtrExtCore/NB/LLC.
const MINIMAL_CLEAR_8_1_ECX: u32 =
    (1 << 11) | (1 << 16) | (1 << 21) | (1 << 23) | (1 << 24) | (1 << 28);

// Leaf 0xB/0x1F level types.
const LEVEL_INVALID: u32 = 0;
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// The CPUID for vCPU `index` of `count`, from what KVM supports.
pub fn vcpu_cpuid(supported: &CpuId, index: u8, count: u8, template: CpuTemplate) -> CpuId {
    let entries = vcpu_entries(supported.as_slice(), index, count, template);
    // No more entries than KVM returned plus three topology subleaves per
    // topology leaf, far below the FAM limit; an error here is a logic bug.
    CpuId::from_entries(&entries).expect("CPUID entries within KVM_MAX_CPUID_ENTRIES")
}

/// The entries of [`vcpu_cpuid`].
fn vcpu_entries(
    supported: &[kvm_cpuid_entry2],
    index: u8,
    count: u8,
    template: CpuTemplate,
) -> Vec<kvm_cpuid_entry2> {
    let apic_id = u32::from(index);
    let count = u32::from(count.max(1));
    let mut out: Vec<kvm_cpuid_entry2> = Vec::with_capacity(supported.len() + 6);
    let mut topology_leaves = Vec::new();
    for entry in supported {
        let mut e = *entry;
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0xffff) | (count.min(0xff) << 16) | (apic_id << 24);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
                if template == CpuTemplate::Minimal {
                    e.ecx &= !MINIMAL_CLEAR_1_ECX;
                }
            }
            0x4 => {
                // Cores per package - 1 in EAX[31:26]; the last-level cache
                // (level 3) is shared by the package, the others per core.
                let cache_level = (e.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3ff) | ((sharing & 0xfff) << 14) | (((count - 1) & 0x3f) << 26);
            }
            0x7 if template == CpuTemplate::Minimal => match e.index {
                0 => {
                    e.ebx &= !MINIMAL_CLEAR_7_EBX;
                    e.ecx &= !MINIMAL_CLEAR_7_ECX;
                    e.edx &= !MINIMAL_CLEAR_7_EDX;
                }
                1 => e.eax &= !MINIMAL_CLEAR_7_1_EAX,
                _ => {}
            },
            0xa | 0xd | 0x14 if template == CpuTemplate::Minimal => {
                (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
            }
            0xb | 0x1f => {
                if !topology_leaves.contains(&e.function) {
                    topology_leaves.push(e.function);
                }
                continue;
            }
            0x8000_0001 if template == CpuTemplate::Minimal => e.ecx &= !MINIMAL_CLEAR_8_1_ECX,
            0x8000_001e => {
                // Extended APIC id; compute unit = vCPU, one thread; node 0.
                e.eax = apic_id;
                e.ebx = apic_id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
        out.push(e);
    }
    for function in topology_leaves {
        out.extend(topology_entries(function, apic_id, count));
    }
    out
}

/// Subleaves 0 (SMT: one thread per core), 1 (core: `count` per package) and 2
/// (the invalid level that ends the enumeration) of an extended topology leaf.
fn topology_entries(function: u32, apic_id: u32, count: u32) -> [kvm_cpuid_entry2; 3] {
    // Bits of the APIC id that number the cores of a package.
    let core_shift = u32::BITS - (count - 1).leading_zeros();
    let subleaf = |index: u32, shift: u32, logical: u32, level: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax: shift,
        ebx: logical,
        ecx: (level << 8) | index,
        edx: apic_id,
        ..Default::default()
    };
    [
        subleaf(0, 0, 1, LEVEL_SMT),
        subleaf(1, core_shift, count, LEVEL_CORE),
        subleaf(2, 0, 0, LEVEL_INVALID),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn supported() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf(0x0, 0, [0x1f, 0, 0, 0]),
            leaf(0x1, 0, [0x906ea, 0x0008_0800, !ECX_HYPERVISOR, u32::MAX]),
            leaf(0x4, 0, [0x121, 0, 0, 0]),
            leaf(0x4, 3, [0x163, 0, 0, 0]),
            leaf(0x7, 0, [0, u32::MAX, u32::MAX, u32::MAX]),
            leaf(0x7, 1, [u32::MAX, 0, 0, 0]),
            leaf(0xa, 0, [0x0730_0805, 1, 2, 3]),
            leaf(0xb, 0, [1, 2, 0x100, 7]),
            leaf(0xb, 1, [4, 8, 0x201, 7]),
            leaf(0xd, 0, [0x2ff, 0xa88, 0xa88, 0]),
            leaf(0x1f, 0, [1, 2, 0x100, 7]),
            leaf(0x8000_0001, 0, [0, 0, u32::MAX, u32::MAX]),
        ]
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn cpuid_sets_apic_id_count_and_hypervisor_bit_per_vcpu() {
        for template in [CpuTemplate::Minimal, CpuTemplate::Passthrough] {
            for index in 0..3 {
                let e = find(&vcpu_entries(&supported(), index, 3, template), 0x1, 0);
                assert_eq!(e.ebx >> 24, u32::from(index));
                assert_eq!((e.ebx >> 16) & 0xff, 3);
                assert_eq!(e.ebx & 0xffff, 0x0800, "brand index and CLFLUSH size kept");
                assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
                assert_ne!(e.edx & EDX_HTT, 0);
            }
        }
        let single = find(
            &vcpu_entries(&supported(), 0, 1, CpuTemplate::Minimal),
            0x1,
            0,
        );
        assert_eq!(single.edx & EDX_HTT, 0);
    }

    #[test]
    fn cpuid_minimal_hides_what_nested_hosts_cannot_run() {
        let entries = vcpu_entries(&supported(), 0, 1, CpuTemplate::Minimal);
        let l1 = find(&entries, 0x1, 0);
        for bit in [
            ECX_CX16,
            ECX_XSAVE,
            ECX_OSXSAVE,
            ECX_AVX,
            ECX_FMA,
            ECX_F16C,
            ECX_POPCNT,
            ECX_PDCM,
        ] {
            assert_eq!(l1.ecx & bit, 0, "bit {bit:#x} hidden");
        }
        assert_ne!(l1.ecx & 1, 0, "SSE3 kept");
        let l7 = find(&entries, 0x7, 0);
        assert_eq!(
            l7.ebx & ((1 << 5) | (1 << 16) | (1 << 4) | (1 << 11)),
            0,
            "AVX2, AVX-512F, TSX"
        );
        assert_ne!(l7.ebx & (1 << 0), 0, "FSGSBASE kept");
        assert_eq!(find(&entries, 0x7, 1).eax & (1 << 4), 0, "AVX-VNNI");
        for function in [0xa, 0xd] {
            let e = find(&entries, function, 0);
            assert_eq!(
                (e.eax, e.ebx, e.ecx, e.edx),
                (0, 0, 0, 0),
                "leaf {function:#x}"
            );
        }
    }

    #[test]
    fn cpuid_passthrough_keeps_supported_features() {
        let entries = vcpu_entries(&supported(), 0, 1, CpuTemplate::Passthrough);
        assert_ne!(find(&entries, 0x1, 0).ecx & (ECX_CX16 | ECX_XSAVE), 0);
        assert_eq!(find(&entries, 0x7, 0).ebx, u32::MAX);
        assert_eq!(find(&entries, 0xa, 0).eax, 0x0730_0805);
    }

    #[test]
    fn cpuid_topology_leaves_describe_one_package_of_count_cores() {
        let entries = vcpu_entries(&supported(), 5, 6, CpuTemplate::Minimal);
        for function in [0xb, 0x1f] {
            let smt = find(&entries, function, 0);
            let core = find(&entries, function, 1);
            let end = find(&entries, function, 2);
            assert_eq!(
                (smt.eax, smt.ebx, smt.ecx >> 8, smt.edx),
                (0, 1, LEVEL_SMT, 5)
            );
            assert_eq!(
                (core.eax, core.ebx, core.ecx >> 8, core.edx),
                (3, 6, LEVEL_CORE, 5)
            );
            assert_eq!(
                (end.ebx, (end.ecx >> 8) & 0xff, end.ecx & 0xff),
                (0, LEVEL_INVALID, 2)
            );
            assert!(
                entries
                    .iter()
                    .filter(|e| e.function == function)
                    .all(|e| e.flags & 1 == 1)
            );
            assert_eq!(entries.iter().filter(|e| e.function == function).count(), 3);
        }
        let l4 = find(&entries, 0x4, 0);
        assert_eq!(l4.eax >> 26, 5, "cores per package - 1");
        assert_eq!(
            (find(&entries, 0x4, 3).eax >> 14) & 0xfff,
            5,
            "L3 shared by the package"
        );
        assert_eq!((l4.eax >> 14) & 0xfff, 0, "L1 per core");
    }

    #[test]
    fn cpuid_core_shift_covers_every_apic_id() {
        for count in 1..=255u32 {
            let [_, core, _] = topology_entries(0xb, 0, count);
            assert!(1u64 << core.eax >= u64::from(count), "count {count}");
        }
    }

    #[test]
    fn cpu_template_parses_and_displays() {
        for t in [CpuTemplate::Minimal, CpuTemplate::Passthrough] {
            assert_eq!(t.to_string().parse::<CpuTemplate>(), Ok(t));
        }
        assert!(
            "host"
                .parse::<CpuTemplate>()
                .unwrap_err()
                .contains("minimal or passthrough")
        );
    }
}
