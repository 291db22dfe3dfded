;; The demo job: a WASI program written in WebAssembly text, so no compiler is needed.
;; It writes one line to stdout, one to stderr, and exits with status 0.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)

  ;; The texts, and an iovec (pointer, length) for each.
  (data (i32.const 64) "Hello from a WebAssembly job, dispatched by Switchboard!\n")
  (data (i32.const 160) "(this line went to stderr)\n")

  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    ;; fd, iovecs, iovec count, where to store the bytes written
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))

  (func (export "_start")
    (call $write (i32.const 1) (i32.const 64) (i32.const 57))
    (call $write (i32.const 2) (i32.const 160) (i32.const 27))
    (call $proc_exit (i32.const 0))))
