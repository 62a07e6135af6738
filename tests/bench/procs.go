package main

import (
	"bufio"
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

// proc is one child process. Each runs in its own process group, so that stopping it also
// stops anything it started, and the kernel kills it if the harness dies (Pdeathsig).
type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{} // closed when the process has exited and its output is read

	mu      sync.Mutex
	stopped bool
}

// children are every process the harness started and has not stopped yet.
var (
	childrenMu sync.Mutex
	children   []*proc
)

// startProc starts bin with args. stdout and stderr, when not nil, receive the output; a
// function given as onLine sees every stderr line as well.
func startProc(name, bin string, args, env []string, dir string, stdout io.Writer, stderr io.Writer, onLine func(string)) (*proc, error) {
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
	cmd.Stdout = stdout
	var pipe io.ReadCloser
	if onLine != nil {
		var err error
		if pipe, err = cmd.StderrPipe(); err != nil {
			return nil, err
		}
	} else {
		cmd.Stderr = stderr
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, done: make(chan struct{})}
	childrenMu.Lock()
	children = append(children, p)
	childrenMu.Unlock()
	read := make(chan struct{})
	if pipe != nil {
		go func() {
			defer close(read)
			sc := bufio.NewScanner(pipe)
			sc.Buffer(make([]byte, 64<<10), 1<<20)
			for sc.Scan() {
				line := sc.Text()
				onLine(line)
				fmt.Fprintln(stderr, line)
			}
			io.Copy(io.Discard, pipe)
		}()
	} else {
		close(read)
	}
	go func() {
		<-read // Wait closes the pipe: read it all first
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
	syscall.Kill(-pgid, syscall.SIGKILL) // anything the process left behind in its group
}

// wait waits for the process to exit by itself, at most bound; past it the process is killed
// and wait reports so.
func (p *proc) wait(bound time.Duration) error {
	timer := time.NewTimer(bound)
	defer timer.Stop()
	select {
	case <-p.done:
	case <-timer.C:
		p.stop(2 * time.Second)
		return fmt.Errorf("%s did not finish within %v; killed", p.name, bound)
	}
	if st := p.cmd.ProcessState; st != nil && !st.Success() {
		return fmt.Errorf("%s: %v", p.name, st)
	}
	return nil
}

// stopAll stops every child still running, in reverse order of start.
func stopAll() {
	childrenMu.Lock()
	list := append([]*proc(nil), children...)
	children = nil
	childrenMu.Unlock()
	for i := len(list) - 1; i >= 0; i-- {
		list[i].stop(10 * time.Second)
	}
}

// ---------------------------------------------------------------------------------------------
// CPU accounting from /proc

// clockTicks is USER_HZ, which Linux fixes at 100 for user space on every architecture Go
// supports there.
const clockTicks = 100

// procCPU reads a process's name and its user+system CPU time so far.
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

// cpuSnapshot is the CPU time of every process on the machine at one moment.
type cpuSnapshot struct {
	at   time.Time
	cpu  map[int]time.Duration
	comm map[int]string
	// The machine's totals from /proc/stat, in ticks: user, nice, system, idle, iowait, irq,
	// softirq, steal.
	stat [8]int64
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
		comm, cpu, err := procCPU(pid)
		if err != nil {
			continue
		}
		s.cpu[pid], s.comm[pid] = cpu, comm
	}
	return s
}

// procUse is how much of one CPU a process used between two snapshots, in percent.
type procUse struct {
	pid  int
	comm string
	pct  float64
}

// usage compares two snapshots: the use of each process in ours (by pid), and of every other
// process that lived through both (busiest first). Processes that started or ended between the
// snapshots are missed, as `ps` would miss them.
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

// writeBytes is how many bytes a process has caused to be written to storage so far
// (write_bytes of /proc/<pid>/io), or -1.
func writeBytes(pid int) int64 {
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

// machineUse is the whole machine's use between two snapshots, in % of one CPU (so up to
// 100 × the number of CPUs): busy (user, system, interrupts, softirq: loopback networking is
// mostly softirq, which no process is charged for), idle, iowait and steal.
type machineUse struct {
	busy, softirq, idle, iowait, steal float64
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
		steal:   d(7),
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
		parts = append(parts, fmt.Sprintf("%s %s%%", u.comm, trunc(u.pct, 1)))
	}
	return strings.Join(parts, ", ")
}
