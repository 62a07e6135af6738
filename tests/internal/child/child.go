// Package child starts and stops the benchmark harnesses' child processes (Caddy, upstreams,
// load generators): each in its own process group, killed by the kernel if the harness dies
// (Pdeathsig), stopped with SIGTERM and then SIGKILL, and every one still running stopped by
// StopAll.
package child

import (
	"bufio"
	"fmt"
	"io"
	"os/exec"
	"sync"
	"syscall"
	"time"
)

// Proc is one child process. Each runs in its own process group, so that stopping it also
// stops anything it started, and the kernel kills it if the harness dies (Pdeathsig).
type Proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{} // closed when the process has exited and its output is read

	mu      sync.Mutex
	stopped bool
}

// children are every process the harness started and has not stopped yet.
var (
	childrenMu sync.Mutex
	children   []*Proc
)

// Start starts bin with args. stdout and stderr, when not nil, receive the output; a
// function given as onLine sees every stderr line as well.
func Start(name, bin string, args, env []string, dir string, stdout io.Writer, stderr io.Writer, onLine func(string)) (*Proc, error) {
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
	p := &Proc{name: name, cmd: cmd, done: make(chan struct{})}
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

func (p *Proc) PID() int { return p.cmd.Process.Pid }

func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM to the process group, and SIGKILL after grace.
func (p *Proc) Stop(grace time.Duration) {
	p.mu.Lock()
	already := p.stopped
	p.stopped = true
	p.mu.Unlock()
	if already {
		<-p.done
		return
	}
	pgid := p.PID()
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

// Wait waits for the process to exit by itself, at most bound; past it the process is killed
// and wait reports so.
func (p *Proc) Wait(bound time.Duration) error {
	timer := time.NewTimer(bound)
	defer timer.Stop()
	select {
	case <-p.done:
	case <-timer.C:
		p.Stop(2 * time.Second)
		return fmt.Errorf("%s did not finish within %v; killed", p.name, bound)
	}
	if st := p.cmd.ProcessState; st != nil && !st.Success() {
		return fmt.Errorf("%s: %v", p.name, st)
	}
	return nil
}

// StopAll stops every child still running, in reverse order of start.
func StopAll() {
	childrenMu.Lock()
	list := append([]*Proc(nil), children...)
	children = nil
	childrenMu.Unlock()
	for i := len(list) - 1; i >= 0; i-- {
		list[i].Stop(10 * time.Second)
	}
}
