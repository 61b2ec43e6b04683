# Sourced by build.sh and export.sh: the task names their --task option takes.
# shellcheck shell=bash

# task_name SCRIPT VALUE: prints task1 or task2 for 1, task1, 2 or task2; otherwise says so on
# stderr, naming SCRIPT, and exits 2.
task_name() {
    case "$2" in
        1 | task1) echo task1 ;;
        2 | task2) echo task2 ;;
        *)
            echo "$1: --task must be 1 or 2, not '$2'" >&2
            exit 2
            ;;
    esac
}
