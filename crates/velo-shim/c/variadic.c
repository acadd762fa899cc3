/* The variadic exec family, which Rust cannot define: each gathers its arguments into
 * an array and calls execve/execvp, which resolve to the shim's own (this file is part
 * of libvelo_shim.so, loaded first), so a tree program or script runs as with execv.
 * glibc's own execl* call its internal __execve, which the shim would never see.
 * The exported names (execl, execle, execlp) are Rust naked functions that jump here
 * (rustc exports only Rust symbols from a cdylib); these stay hidden. */
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <unistd.h>

extern char **environ;

/* Arguments beyond this many are refused with E2BIG (the array lives on the stack: these
 * functions may run after vfork, where malloc is not safe). */
#define VELO_MAX_ARGS 4096

#define GATHER(first, ap, argv, n)                      \
    do {                                                \
        (argv)[0] = (char *)(first);                    \
        (n) = 1;                                        \
        while ((argv)[(n) - 1] != NULL) {               \
            if ((n) >= VELO_MAX_ARGS) {                 \
                va_end(ap);                             \
                errno = E2BIG;                          \
                return -1;                              \
            }                                           \
            (argv)[(n)++] = va_arg((ap), char *);       \
        }                                               \
    } while (0)

__attribute__((visibility("hidden"))) int velo_execl(const char *path, const char *arg, ...) {
    char *argv[VELO_MAX_ARGS];
    size_t n;
    va_list ap;
    va_start(ap, arg);
    GATHER(arg, ap, argv, n);
    va_end(ap);
    return execve(path, argv, environ);
}

__attribute__((visibility("hidden"))) int velo_execlp(const char *file, const char *arg, ...) {
    char *argv[VELO_MAX_ARGS];
    size_t n;
    va_list ap;
    va_start(ap, arg);
    GATHER(arg, ap, argv, n);
    va_end(ap);
    return execvp(file, argv);
}

__attribute__((visibility("hidden"))) int velo_execle(const char *path, const char *arg, ...) {
    char *argv[VELO_MAX_ARGS];
    size_t n;
    va_list ap;
    va_start(ap, arg);
    GATHER(arg, ap, argv, n);
    char **envp = va_arg(ap, char **);
    va_end(ap);
    return execve(path, argv, envp);
}
