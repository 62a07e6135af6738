package main

import (
	"github.com/caddy-progress/progress/tests/internal/procstat"
)

// ---------------------------------------------------------------------------------------------
// CPU accounting from /proc: tests/internal/procstat, shared with the other harness

type (
	cpuSnapshot = procstat.Snapshot
	procUse     = procstat.Use
	machineUse  = procstat.Machine
)

var (
	takeSnapshot   = procstat.Take
	usage          = procstat.Usage
	machineUsage   = procstat.MachineUsage
	sumUse         = procstat.SumUse
	describeOthers = procstat.DescribeOthers
	procCPU        = procstat.ProcCPU
	loadavg        = procstat.Loadavg
	writeBytes     = procstat.WriteBytes
)
