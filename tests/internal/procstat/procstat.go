// Package procstat reads CPU and I/O accounting from Linux's /proc for the benchmark harnesses
// (tests/bench, tests/latency): how much CPU each process and the whole machine used between two
// moments, so a measurement can say what else ran beside it.
package procstat

import (
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// clockTicks is USER_HZ, which Linux fixes at 100 for user space on every architecture Go
// supports there.
const clockTicks = 100

// ProcCPU reads a process's name and its user+system CPU time so far.
func ProcCPU(pid int) (comm string, cpu time.Duration, err error) {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return "", 0, err
	}
	s := string(b)
	open, closing := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
	if open < 0 || closing < open {
		return "", 0, errors.New("malformed stat")
	}
	comm = s[open+1 : closing]
	f := strings.Fields(s[closing+1:])
	if len(f) < 13 {
		return "", 0, errors.New("short stat")
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return "", 0, errors.New("malformed stat times")
	}
	return comm, time.Duration(ut+st) * time.Second / clockTicks, nil
}

// Snapshot is the CPU time of every process on the machine, and the machine's totals, at one
// moment.
type Snapshot struct {
	At   time.Time
	cpu  map[int]time.Duration
	comm map[int]string
	// The machine's totals from /proc/stat, in ticks: user, nice, system, idle, iowait, irq,
	// softirq, steal.
	stat [8]int64
}

// Take reads a snapshot now.
func Take() Snapshot {
	s := Snapshot{At: time.Now(), cpu: map[int]time.Duration{}, comm: map[int]string{}}
	if b, err := os.ReadFile("/proc/stat"); err == nil {
		line, _, _ := strings.Cut(string(b), "\n")
		if f := strings.Fields(line); len(f) >= 9 && f[0] == "cpu" {
			for i := range s.stat {
				s.stat[i], _ = strconv.ParseInt(f[i+1], 10, 64)
			}
		}
	}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if comm, cpu, err := ProcCPU(pid); err == nil {
			s.cpu[pid], s.comm[pid] = cpu, comm
		}
	}
	return s
}

// Use is how much of one CPU a process used between two snapshots, in percent.
type Use struct {
	PID  int
	Comm string
	Pct  float64
}

// Usage compares two snapshots: the use of each process in ours (by pid, summed by the name
// given), and of every other process that lived through both (busiest first). Processes that
// started or ended between the snapshots are missed, as `ps` would miss them.
func Usage(a, b Snapshot, ours map[int]string) (mine map[string]float64, others []Use) {
	wall := b.At.Sub(a.At)
	mine = map[string]float64{}
	if wall <= 0 {
		return mine, nil
	}
	for pid, cb := range b.cpu {
		ca, ok := a.cpu[pid]
		if !ok {
			continue
		}
		pct := 100 * float64(cb-ca) / float64(wall)
		if name, ok := ours[pid]; ok {
			mine[name] += pct
			continue
		}
		if pct > 0 {
			others = append(others, Use{PID: pid, Comm: b.comm[pid], Pct: pct})
		}
	}
	sort.Slice(others, func(i, j int) bool { return others[i].Pct > others[j].Pct })
	return mine, others
}

// Machine is the whole machine's use between two snapshots, in % of one CPU (so up to 100 ×
// the number of CPUs): busy (user, system, interrupts, softirq: loopback networking is mostly
// softirq, which no process is charged for), idle, iowait and steal.
type Machine struct {
	Busy, Softirq, Idle, IOWait, Steal float64
}

// MachineUsage is the machine's use between two snapshots.
func MachineUsage(a, b Snapshot) Machine {
	wall := b.At.Sub(a.At).Seconds()
	if wall <= 0 {
		return Machine{}
	}
	d := func(i int) float64 { return 100 * float64(b.stat[i]-a.stat[i]) / clockTicks / wall }
	return Machine{
		Busy:    d(0) + d(1) + d(2) + d(5) + d(6) + d(7),
		Softirq: d(6),
		Idle:    d(3),
		IOWait:  d(4),
		Steal:   d(7),
	}
}

// SumUse is the total of a list of uses.
func SumUse(list []Use) float64 {
	t := 0.0
	for _, u := range list {
		t += u.Pct
	}
	return t
}

// DescribeOthers names the first n uses of a list, as "name 12.3%, …"; figures are truncated,
// never rounded up.
func DescribeOthers(list []Use, n int) string {
	if len(list) == 0 {
		return "none"
	}
	var parts []string
	for i, u := range list {
		if i == n {
			break
		}
		parts = append(parts, fmt.Sprintf("%s %s%%", u.Comm, strconv.FormatFloat(math.Trunc(u.Pct*10)/10, 'f', 1, 64)))
	}
	return strings.Join(parts, ", ")
}

// WriteBytes is how many bytes a process has caused to be written to storage so far
// (write_bytes of /proc/<pid>/io), or -1.
func WriteBytes(pid int) int64 {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "io"))
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "write_bytes: "); ok {
			n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err == nil {
				return n
			}
		}
	}
	return -1
}

// Loadavg is /proc/loadavg as it reads, or "?".
func Loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(string(b))
}
