//! What the CPU (and the OS) let the kernels use, asked once per process,
//! and which of the kernel sets the process runs.
//!
//! The sets compute the same bits (see [`super::reference`]), so which one
//! runs is a matter of speed only; `SGL_KERNEL` (or [`select`], which
//! `--kernel` calls) forces one, so that every set can be tested and
//! measured on a machine that has the faster ones too.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// A set of kernels: the matmul, the activation quantisation and the
/// attention loops, each for one instruction set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust loops (what the compiler makes of them).
    Portable,
    /// AVX2 and FMA: every x86-64 server of the last decade, and the AMD
    /// EPYC (Zen 3) under most confidential VMs.
    Avx2,
    /// AVX2 and FMA with AVX-VNNI's byte dot products (AMD Zen 5, Intel
    /// cores since Alder Lake and Xeon 6 E-cores, which lack AVX-512): the
    /// AVX2 set with its own matmul.
    AvxVnni,
    /// AVX-512 F/BW/VL/VNNI, with AMX tiles for prefill where present.
    Avx512,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::AvxVnni => "avxvnni",
            Isa::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run the set.
    pub fn supported(self) -> bool {
        match self {
            Isa::Portable => true,
            Isa::Avx2 => cpu().avx2,
            Isa::AvxVnni => cpu().avxvnni,
            Isa::Avx512 => cpu().avx512,
        }
    }

    fn code(self) -> u8 {
        match self {
            Isa::Portable => 1,
            Isa::Avx2 => 2,
            Isa::Avx512 => 3,
            Isa::AvxVnni => 4,
        }
    }

    /// Whether the set runs the AVX2 quantisation and attention loops
    /// (AVX-VNNI changes the matmul only).
    pub fn avx2_family(self) -> bool {
        matches!(self, Isa::Avx2 | Isa::AvxVnni)
    }
}

/// A kernel setting: one set, or the fastest this CPU has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelChoice {
    Auto,
    Only(Isa),
}

impl std::str::FromStr for KernelChoice {
    type Err = KernelError;

    fn from_str(s: &str) -> Result<Self, KernelError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(KernelChoice::Auto),
            "portable" => Ok(KernelChoice::Only(Isa::Portable)),
            "avx2" => Ok(KernelChoice::Only(Isa::Avx2)),
            "avxvnni" | "avx-vnni" => Ok(KernelChoice::Only(Isa::AvxVnni)),
            "avx512" => Ok(KernelChoice::Only(Isa::Avx512)),
            _ => Err(KernelError::Unknown(s.to_string())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("unknown kernel {0:?}: one of auto, avx512, avxvnni, avx2, portable")]
    Unknown(String),
    #[error("this CPU cannot run the {} kernels (it has: {})", .0.name(), available_names())]
    Unsupported(Isa),
}

fn available_names() -> String {
    [Isa::Avx512, Isa::AvxVnni, Isa::Avx2, Isa::Portable]
        .into_iter()
        .filter(|i| i.supported())
        .map(Isa::name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The CPU's features that the kernels care about.
#[derive(Debug, Clone, Copy)]
struct Cpu {
    avx2: bool,
    avxvnni: bool,
    avx512: bool,
}

fn cpu() -> Cpu {
    static CPU: OnceLock<Cpu> = OnceLock::new();
    *CPU.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            // The AVX2 kernels use FMA for the scaling (as the reference's
            // `mul_add`) and F16C nowhere; AVX-512 ones assume AVX2 too.
            let avx2 = has!("avx2") && has!("fma");
            Cpu {
                avx2,
                avxvnni: avx2 && has!("avxvnni"),
                avx512: avx2
                    && has!("avx512f")
                    && has!("avx512bw")
                    && has!("avx512vl")
                    && has!("avx512vnni"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Cpu {
                avx2: false,
                avxvnni: false,
                avx512: false,
            }
        }
    })
}

/// The fastest set this CPU runs.
pub fn best_isa() -> Isa {
    if Isa::Avx512.supported() {
        Isa::Avx512
    } else if Isa::AvxVnni.supported() {
        Isa::AvxVnni
    } else if Isa::Avx2.supported() {
        Isa::Avx2
    } else {
        Isa::Portable
    }
}

/// 0 until decided; then an [`Isa::code`].
static ACTIVE: AtomicU8 = AtomicU8::new(0);

/// The set the kernels run: the one [`select`] chose, else `SGL_KERNEL`'s
/// (`SGL_NO_SIMD=1` means `portable`), else the fastest. A setting this CPU
/// cannot run falls back to the fastest with a warning; [`select`] refuses it.
pub fn isa() -> Isa {
    match ACTIVE.load(Ordering::Relaxed) {
        1 => Isa::Portable,
        2 => Isa::Avx2,
        3 => Isa::Avx512,
        4 => Isa::AvxVnni,
        _ => {
            let chosen = from_env();
            // Another thread may have decided meanwhile; the first word wins.
            let _ = ACTIVE.compare_exchange(0, chosen.code(), Ordering::Relaxed, Ordering::Relaxed);
            isa()
        }
    }
}

fn from_env() -> Isa {
    if std::env::var_os("SGL_NO_SIMD").is_some() {
        return Isa::Portable;
    }
    let Some(v) = std::env::var_os("SGL_KERNEL") else {
        return best_isa();
    };
    match v.to_string_lossy().parse::<KernelChoice>() {
        Ok(KernelChoice::Auto) => best_isa(),
        Ok(KernelChoice::Only(i)) if i.supported() => i,
        Ok(KernelChoice::Only(i)) => {
            tracing::warn!("SGL_KERNEL: {}", KernelError::Unsupported(i));
            best_isa()
        }
        Err(e) => {
            tracing::warn!("SGL_KERNEL: {e}");
            best_isa()
        }
    }
}

/// Run `choice` from now on (`sgl bench --kernel`, `sgl node serve
/// --kernel`); returns the set that runs. Every set computes the same bits,
/// so a change between two steps changes their speed only.
pub fn select(choice: KernelChoice) -> Result<Isa, KernelError> {
    let i = match choice {
        KernelChoice::Auto => best_isa(),
        KernelChoice::Only(i) if i.supported() => i,
        KernelChoice::Only(i) => return Err(KernelError::Unsupported(i)),
    };
    ACTIVE.store(i.code(), Ordering::Relaxed);
    Ok(i)
}

/// Whether the AVX-512 VNNI kernels run.
pub fn simd_available() -> bool {
    isa() == Isa::Avx512
}

/// Whether the AVX2 kernels run (with or without AVX-VNNI).
pub fn avx2_active() -> bool {
    isa().avx2_family()
}

/// Whether the AMX kernel can run here: the AVX-512 set runs, the CPU has
/// AMX-INT8 and the OS has given this process the tile state (Linux hands
/// it out on request). `SGL_NO_AMX` turns it off.
pub fn amx_available() -> bool {
    simd_available() && amx_granted()
}

/// Whether the CPU and the OS allow AMX tiles, whichever set is selected.
pub(super) fn amx_supported() -> bool {
    amx_granted()
}

fn amx_granted() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            if !Isa::Avx512.supported() || std::env::var_os("SGL_NO_AMX").is_some() {
                return false;
            }
            // CPUID leaf 7: EDX bit 24 AMX-TILE, bit 25 AMX-INT8.
            let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
            if edx & (3 << 24) != 3 << 24 {
                return false;
            }
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain system call with integer arguments.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                )
            };
            rc == 0
        })
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}
