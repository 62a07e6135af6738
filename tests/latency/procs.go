package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/caddy-progress/progress/tests/internal/procstat"
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
