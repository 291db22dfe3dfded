"""Process plumbing both commands share and that is not protocol: log output (`logfmt`)
and files that hold a token (`secret_files`). Imports nothing of ours."""
