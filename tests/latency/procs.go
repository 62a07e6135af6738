package main

import (
	"bufio"
	"bytes"
	"os"
	"strconv"
	"strings"
	"sync"

	"github.com/caddy-progress/progress/tests/internal/procstat"
)

// syncBuffer collects a child's stdout.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) firstLine() (string, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	line, err := bufio.NewReader(bytes.NewReader(b.buf.Bytes())).ReadString('\n')
	if err != nil {
		return "", false
	}
	return strings.TrimSpace(line), true
}

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
