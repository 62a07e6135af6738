package main

import (
	"bufio"
	"fmt"
	"io"
	"os/exec"
	"sync"
	"syscall"
	"time"

	"github.com/caddy-progress/progress/tests/internal/procstat"
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
