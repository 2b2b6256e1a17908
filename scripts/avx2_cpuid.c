/* Loaded with LD_PRELOAD (scripts/as_avx2_cpu.sh), this makes a process on an x86-64 Linux machine
 * see a CPU with AVX2 and FMA but no AVX-512, VNNI or AMX, while it runs natively on this one.
 * With ADAFOCUS_CPUID_HIDE=amx it hides AMX alone: an AMX CPU seen as one with AVX-512 and VNNI, where
 * ONNX Runtime's int8 GEMMs take their VNNI kernels instead of their AMX ones.
 *
 * Why: the kernels ONNX Runtime, PyTorch and numpy pick depend on what the CPUID instruction
 * reports, and INT8 results and speed differ between the x86 kinds (ONNX Runtime's uint8 x int8
 * kernels saturate without VNNI; see adafocus/machine.py). The development machines are AVX-512
 * ones; qemu's user-mode emulator can pretend otherwise, but ~20x slower, so it cannot time anything.
 *
 * How: Linux's CPUID faulting (arch_prctl ARCH_SET_CPUID, 0; the cpuid_fault flag in /proc/cpuinfo)
 * turns every CPUID instruction of this process into a SIGSEGV. The handler runs the real CPUID with
 * faulting briefly off, clears the feature bits below in leaf 7 (sub-leaves 0 and 1), writes the
 * registers back and steps over the 2-byte instruction. Threads inherit the setting; execve clears
 * it, and the preload sets it again in each new program. Programs that install their own SIGSEGV
 * handler (Python's faulthandler, which pytest enables) keep working: sigaction() and signal() for
 * SIGSEGV are answered here, and every fault that is not a CPUID is passed on to what they asked for.
 *
 * The code runs on this machine's cores, so timings show the AVX2 code paths on this
 * microarchitecture, not an AVX2-only CPU's. */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))
/* leaf 7, sub-leaf 0. EBX: AVX512F, DQ, IFMA, PF, ER, CD, BW, VL */
#define HIDE_7_0_EBX (BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31))
/* ECX: AVX512_VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ */
#define HIDE_7_0_ECX (BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14))
/* EDX: AVX512_4VNNIW, 4FMAPS, VP2INTERSECT, AMX-BF16, AVX512_FP16, AMX-TILE, AMX-INT8 */
#define HIDE_7_0_EDX (BIT(2) | BIT(3) | BIT(8) | BIT(22) | BIT(23) | BIT(24) | BIT(25))
/* leaf 7, sub-leaf 1. EAX: AVX-VNNI, AVX512_BF16, AMX-FP16, AVX-IFMA; EDX: AVX-VNNI-INT8, AVX-NE-CONVERT,
 * AVX-VNNI-INT16 */
#define HIDE_7_1_EAX (BIT(4) | BIT(5) | BIT(21) | BIT(23))
#define HIDE_7_1_EDX (BIT(4) | BIT(5) | BIT(10))
/* AMX alone: leaf 7.0 EDX AMX-BF16, AMX-TILE, AMX-INT8; leaf 7.1 EAX AMX-FP16, EDX AMX-COMPLEX */
#define AMX_7_0_EDX (BIT(22) | BIT(24) | BIT(25))
#define AMX_7_1_EAX BIT(21)
#define AMX_7_1_EDX BIT(8)

/* what on_segv clears, chosen once from ADAFOCUS_CPUID_HIDE when the library loads */
static uint32_t hide_7_0_ebx = HIDE_7_0_EBX, hide_7_0_ecx = HIDE_7_0_ECX, hide_7_0_edx = HIDE_7_0_EDX;
static uint32_t hide_7_1_eax = HIDE_7_1_EAX, hide_7_1_edx = HIDE_7_1_EDX;

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);
static sigaction_fn real_sigaction;
static struct sigaction program_segv; /* what the program asked for SIGSEGV (initially the default) */

static void pass_on(int sig, siginfo_t *info, void *context) {
    if (program_segv.sa_flags & SA_SIGINFO) {
        program_segv.sa_sigaction(sig, info, context);
    } else if (program_segv.sa_handler != SIG_DFL && program_segv.sa_handler != SIG_IGN) {
        program_segv.sa_handler(sig);
    } else { /* the default: die of this fault, which happens again on return */
        struct sigaction fallback;
        memset(&fallback, 0, sizeof fallback);
        fallback.sa_handler = SIG_DFL;
        real_sigaction(SIGSEGV, &fallback, NULL);
    }
}

static void on_segv(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *reg = uc->uc_mcontext.gregs;
    const uint8_t *ip = (const uint8_t *)reg[REG_RIP];
    if (info->si_code != SI_KERNEL || ip[0] != 0x0f || ip[1] != 0xa2) {
        pass_on(sig, info, context);
        return;
    }
    uint32_t leaf = (uint32_t)reg[REG_RAX], sub = (uint32_t)reg[REG_RCX], a, b, c, d;
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    __cpuid_count(leaf, sub, a, b, c, d);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
    if (leaf == 7 && sub == 0) {
        b &= ~hide_7_0_ebx;
        c &= ~hide_7_0_ecx;
        d &= ~hide_7_0_edx;
    } else if (leaf == 7 && sub == 1) {
        a &= ~hide_7_1_eax;
        d &= ~hide_7_1_edx;
    }
    reg[REG_RAX] = a;
    reg[REG_RBX] = b;
    reg[REG_RCX] = c;
    reg[REG_RDX] = d;
    reg[REG_RIP] += 2;
}

int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (sig != SIGSEGV) return real_sigaction(sig, act, old);
    if (old) *old = program_segv;
    if (act) program_segv = *act;
    return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
    struct sigaction act, old;
    memset(&act, 0, sizeof act);
    act.sa_handler = handler;
    act.sa_flags = SA_RESTART;
    if (sigaction(sig, &act, &old) != 0) return SIG_ERR;
    return old.sa_handler;
}

__attribute__((constructor)) static void hide_features(void) {
    const char *hide = getenv("ADAFOCUS_CPUID_HIDE");
    if (hide && strcmp(hide, "amx") == 0) {
        hide_7_0_ebx = hide_7_0_ecx = 0;
        hide_7_0_edx = AMX_7_0_EDX;
        hide_7_1_eax = AMX_7_1_EAX;
        hide_7_1_edx = AMX_7_1_EDX;
    } else if (hide && *hide && strcmp(hide, "avx512") != 0) {
        fprintf(stderr, "avx2_cpuid: ADAFOCUS_CPUID_HIDE=%s is neither avx512 (AVX-512, VNNI and AMX: the default) "
                        "nor amx (AMX alone)\n", hide);
        _exit(2);
    }
    real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    program_segv.sa_handler = SIG_DFL;
    struct sigaction trap;
    memset(&trap, 0, sizeof trap);
    trap.sa_sigaction = on_segv;
    /* on a thread's alternate stack where it has one (faulthandler sets one up), so that a stack
     * overflow still reaches the program's handler */
    trap.sa_flags = SA_SIGINFO | SA_ONSTACK;
    if (!real_sigaction || real_sigaction(SIGSEGV, &trap, NULL) != 0 ||
        syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        fprintf(stderr, "avx2_cpuid: this machine cannot make CPUID fault (Linux arch_prctl ARCH_SET_CPUID; "
                        "no cpuid_fault flag in /proc/cpuinfo): use scripts/test_on_avx2_cpu.sh --qemu\n");
        _exit(3);
    }
}
