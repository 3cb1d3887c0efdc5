# Source on the GPU host from the repo root once both parts of .fa4-carry are in /tmp/fa4 (scripts/fa4_carry.sh).
mkdir -p /tmp/fa4 && cp -n .fa4-carry/part-* /tmp/fa4/ 2>/dev/null
mkdir -p /tmp/fa4site && cat /tmp/fa4/part-* | xz -d | tar xf - -C /tmp/fa4site && \
  export PYTHONPATH=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}  # its .pth, which PYTHONPATH does not run
