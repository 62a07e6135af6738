package fanout

import (
	"os"
	"strconv"
	"strings"

	"github.com/caddy-progress/progress/tests/internal/procstat"
)

// ---------------------------------------------------------------------------------------------
// CPU accounting from /proc: tests/internal/procstat, shared with the other harness

type (
	procUse    = procstat.Use
	machineUse = procstat.Machine
)

var (
	takeSnapshot   = procstat.Take
	usage          = procstat.Usage
	machineUsage   = procstat.MachineUsage
	sumUse         = procstat.SumUse
	describeOthers = procstat.DescribeOthers
	loadavg        = procstat.Loadavg
)

// procsRunning is the number of runnable threads on the machine now (procs_running of
// /proc/stat, which counts the reader too).
func procsRunning() int { return statField("procs_running ") }

// forkCount is how many processes the machine has created since boot.
func forkCount() int64 { return int64(statField("processes ")) }

func statField(name string) int {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, name); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(v))
			return n
		}
	}
	return -1
}
