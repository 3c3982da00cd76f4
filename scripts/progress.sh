#!/usr/bin/env bash
# Run a long build quietly, but show that it moves: of its output, only the build's progress
# (cmake's "[ 42%]" lines, ninja's "[12/345]") is shown, one line per new 10 % step, with the
# time so far, then how long it took. Everything goes to LOG; on failure its last 50 lines are shown.
# A command that builds nothing (no progress line) prints nothing.
# Usage: progress.sh LOG LABEL COMMAND [ARG...]
set -uo pipefail

log=${1:?usage: progress.sh LOG LABEL COMMAND [ARG...]}
label=${2:?usage: progress.sh LOG LABEL COMMAND [ARG...]}
shift 2
[ $# -gt 0 ] || { echo "usage: progress.sh LOG LABEL COMMAND [ARG...]" >&2; exit 2; }

elapsed() {
    local s=$((SECONDS - start))
    printf '%dm%02ds' $((s / 60)) $((s % 60))
}

start=$SECONDS
shown=-1
: >"$log"
while IFS= read -r line || [ -n "$line" ]; do
    printf '%s\n' "$line" >>"$log"
    if [[ $line =~ \[\ *([0-9]{1,3})%\] ]]; then
        percent=${BASH_REMATCH[1]}
    elif [[ $line =~ \[([0-9]+)/([0-9]+)\] ]] && [ "${BASH_REMATCH[2]}" -gt 0 ]; then
        percent=$((BASH_REMATCH[1] * 100 / BASH_REMATCH[2]))
    else
        continue
    fi
    step=$((percent / 10 * 10))
    if [ "$step" -gt "$shown" ]; then
        shown=$step
        echo "$label: $step% ($(elapsed))"
    fi
done < <("$@" 2>&1)
wait $! # the command's own exit status (bash >= 4.4 waits for a process substitution)
status=$?

if [ "$status" -ne 0 ]; then
    echo "$label: failed after $(elapsed) (exit $status); the last lines of $log:" >&2
    tail -50 "$log" >&2
elif [ "$shown" -ge 0 ]; then
    echo "$label: done in $(elapsed)"
fi
exit "$status"
