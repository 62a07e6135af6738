package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// The process handling follows tests/bench (procs.go): every child in its own process group,
// killed by the kernel if the harness dies (Pdeathsig), stopped with SIGTERM then SIGKILL.

// proc is one child process.
type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{} // closed when the process has exited

	mu      sync.Mutex
	stopped bool
}

var (
	childrenMu sync.Mutex
	children   []*proc
)

// startProc starts bin with args; stdout and stderr go to the given writers (nil: discarded).
func startProc(name, bin string, args, env []string, dir string, stdout, stderr io.Writer) (*proc, error) {
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	cmd.Env = env
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if stdout == nil {
		stdout = io.Discard
	}
	if stderr == nil {
		stderr = io.Discard
	}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, done: make(chan struct{})}
	childrenMu.Lock()
	children = append(children, p)
	childrenMu.Unlock()
	go func() {
		cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM to the process group, and SIGKILL after grace.
func (p *proc) stop(grace time.Duration) {
	p.mu.Lock()
	already := p.stopped
	p.stopped = true
	p.mu.Unlock()
	if already {
		<-p.done
		return
	}
	pgid := p.pid()
	syscall.Kill(-pgid, syscall.SIGTERM)
	timer := time.NewTimer(grace)
	defer timer.Stop()
	select {
	case <-p.done:
	case <-timer.C:
		syscall.Kill(-pgid, syscall.SIGKILL)
		<-p.done
	}
	syscall.Kill(-pgid, syscall.SIGKILL)
}

// stopAll stops every child still running, newest first.
func stopAll() {
	childrenMu.Lock()
	list := append([]*proc(nil), children...)
	children = nil
	childrenMu.Unlock()
	for i := len(list) - 1; i >= 0; i-- {
		list[i].stop(10 * time.Second)
	}
}

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
// CPU accounting from /proc

// clockTicks is USER_HZ, fixed at 100 for user space.
const clockTicks = 100

// procCPU reads a process's name and user+system CPU time so far.
func procCPU(pid int) (comm string, cpu time.Duration, err error) {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return "", 0, err
	}
	s := string(b)
	open, closing := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
	if open < 0 || closing < open {
		return "", 0, errors.New("malformed stat")
	}
	f := strings.Fields(s[closing+1:])
	if len(f) < 13 {
		return "", 0, errors.New("short stat")
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return "", 0, errors.New("malformed stat times")
	}
	return s[open+1 : closing], time.Duration(ut+st) * time.Second / clockTicks, nil
}

// cpuSnapshot is the CPU time of every process, and the machine's totals, at one moment.
type cpuSnapshot struct {
	at   time.Time
	cpu  map[int]time.Duration
	comm map[int]string
	stat [8]int64 // /proc/stat cpu line: user nice system idle iowait irq softirq steal
}

func takeSnapshot() cpuSnapshot {
	s := cpuSnapshot{at: time.Now(), cpu: map[int]time.Duration{}, comm: map[int]string{}}
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
		if comm, cpu, err := procCPU(pid); err == nil {
			s.cpu[pid], s.comm[pid] = cpu, comm
		}
	}
	return s
}

// procUse is how much of one CPU a process used between two snapshots, in percent.
type procUse struct {
	pid  int
	comm string
	pct  float64
}

// usage splits the CPU use between two snapshots into ours (by name) and everyone else's
// (busiest first).
func usage(a, b cpuSnapshot, ours map[int]string) (mine map[string]float64, others []procUse) {
	wall := b.at.Sub(a.at)
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
			others = append(others, procUse{pid: pid, comm: b.comm[pid], pct: pct})
		}
	}
	sort.Slice(others, func(i, j int) bool { return others[i].pct > others[j].pct })
	return mine, others
}

// machineUse is the machine's use between two snapshots in % of one CPU (up to 100 × nproc).
type machineUse struct {
	busy, softirq, idle, iowait float64
}

func machineUsage(a, b cpuSnapshot) machineUse {
	wall := b.at.Sub(a.at).Seconds()
	if wall <= 0 {
		return machineUse{}
	}
	d := func(i int) float64 { return 100 * float64(b.stat[i]-a.stat[i]) / clockTicks / wall }
	return machineUse{
		busy:    d(0) + d(1) + d(2) + d(5) + d(6) + d(7),
		softirq: d(6),
		idle:    d(3),
		iowait:  d(4),
	}
}

func sumUse(list []procUse) float64 {
	t := 0.0
	for _, u := range list {
		t += u.pct
	}
	return t
}

func describeOthers(list []procUse, n int) string {
	if len(list) == 0 {
		return "none"
	}
	var parts []string
	for i, u := range list {
		if i == n {
			break
		}
		parts = append(parts, fmt.Sprintf("%s %.1f%%", u.comm, u.pct))
	}
	return strings.Join(parts, ", ")
}

func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(string(b))
}

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
