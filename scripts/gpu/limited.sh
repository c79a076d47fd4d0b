# shellcheck shell=bash
# `source scripts/gpu/limited.sh`, then `limited SECONDS CMD...`: runs CMD with a time limit. A command still
# running at the limit gets every thread's stack printed (cuda-gdb attaches; the GPU image has no gdb) before it
# is killed, so a hang shows where it waits. Prints "[rc=N, T s]" to stderr; returns CMD's status (124 if killed).
limited() {
  local limit=$1
  shift
  local s
  s=$(date +%s.%N)
  "$@" &
  local pid=$!
  (
    # The sleep must not hold our stdout: killed early, its orphan would keep a `| tee` open until the limit.
    sleep "$limit" </dev/null >/dev/null 2>&1
    if kill -0 "$pid" 2>/dev/null; then
      echo "== still running after ${limit}s: stacks of pid $pid" >&2
      if command -v cuda-gdb >/dev/null; then
        timeout 120 cuda-gdb -p "$pid" -batch -ex "info threads" -ex "thread apply all bt 40" 2>&1 \
          | grep -v -e '^\[New LWP' -e '^warning: ' >&2
      else
        for t in /proc/"$pid"/task/*; do echo "$t $(cat "$t"/comm) $(cat "$t"/wchan)" >&2; done
      fi
      touch "/tmp/limited.$pid.killed"
      kill -9 "$pid" 2>/dev/null
    fi
  ) &
  local watchdog=$!
  wait "$pid"
  local rc=$?
  kill "$watchdog" 2>/dev/null
  wait "$watchdog" 2>/dev/null
  if [ -f "/tmp/limited.$pid.killed" ]; then
    rc=124
    rm -f "/tmp/limited.$pid.killed"
  fi
  echo "  [rc=$rc$([ $rc = 124 ] && echo ", killed after ${limit}s"), $(awk "BEGIN{printf \"%.2f\", $(date +%s.%N) - $s}") s]" >&2
  return $rc
}
