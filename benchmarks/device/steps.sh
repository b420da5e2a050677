# Shared by the multi-GPU device scripts: steps in priority order, each under its own timeout, capped by a
# deadline for the whole call (DEADLINE s after start, default 550: the device tool kills at 600), logged to
# $OUT/NAME.log. STEPS (set by the caller) names the steps to run, by their prefix before "_".
DEADLINE=${DEADLINE:-550}
T0=$SECONDS
left() {  # seconds for the next step: its cap, or what is left before the deadline (0: skip it)
  local l=$((DEADLINE - (SECONDS - T0))); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 20 ] && l=0; echo $l
}
run_step() {  # run_step NAME CAP CMD...: timed, logged to $OUT/NAME.log, skipped when no time is left
  local name=$1 cap=$2; shift 2
  case " $STEPS " in *" ${name%%_*} "*) ;; *) return 0 ;; esac
  local t; t=$(left "$cap")
  if [ "$t" -eq 0 ]; then echo "== $name: SKIPPED (deadline; run it with STEPS=${name%%_*})"; return 0; fi
  echo "== $name (timeout ${t}s, at $((SECONDS - T0))s)"
  local s=$SECONDS
  timeout "$t" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v -i -E 'warn|return func|^\s*$|sliced_mesh'
  local rc=${PIPESTATUS[0]}
  echo "== $name: rc=$rc in $((SECONDS - s))s$([ $rc -eq 124 ] && echo ' (TIMEOUT)')"
}

