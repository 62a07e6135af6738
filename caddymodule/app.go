// Package caddymodule adapts caddy-progress to Caddy: the `progress` app (the global option),
// the `progress` handler that turns requests into jobs, and the `progress_api` handler that
// serves them. The logic lives in package engine and package store; this package parses
// configuration and hands requests over.
package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"
	"go.uber.org/zap"

	"github.com/caddy-progress/progress/engine"
	"github.com/caddy-progress/progress/store"
	"github.com/caddy-progress/progress/store/redisstore"
	"github.com/caddy-progress/progress/upstreamhook"
)

func init() {
	caddy.RegisterModule(App{})
}

// App is the `progress` app: the options every `progress` and `progress_api` handler shares,
// and the store they keep jobs in. Configure it with the `progress` global option.
type App struct {
	// Store is where jobs are kept: the path of a bbolt file (default progress/progress.db
	// under Caddy's data directory), or the URL of a Redis server
	// (redis://[user:password@]host:port/db, rediss:// for TLS), shared by every Caddy instance
	// configured with it. Placeholders such as {env.REDIS_URL} are expanded.
	Store string `json:"store,omitempty"`
	// LeaseTime, with a Redis store, is how long an instance may fail to renew its lease
	// before the other instances end its unfinished jobs as failed/interrupted. Default 10s.
	LeaseTime caddy.Duration `json:"lease_time,omitempty"`
	// Retain is how long finished jobs, their events and results are kept. Default 24h.
	Retain caddy.Duration `json:"retain,omitempty"`
	// JobsPath is where the job API lives. Default /_jobs.
	JobsPath string `json:"jobs_path,omitempty"`
	// MaxWait caps Prefer: wait=N and long-poll waits. Default 60s.
	MaxWait caddy.Duration `json:"max_wait,omitempty"`
	// Heartbeat is the interval of SSE comment lines that keep idle streams open. Default 15s.
	Heartbeat caddy.Duration `json:"heartbeat,omitempty"`
	// WriteTimeout bounds one write to an event stream; a subscriber that stops reading is
	// dropped after it. Default 30s.
	WriteTimeout caddy.Duration `json:"write_timeout,omitempty"`
	// OpenTimeout is how long to wait for a store file another process holds. Default 5s.
	OpenTimeout caddy.Duration `json:"open_timeout,omitempty"`
	// MaxResultSize bounds a stored upstream response body. Default 1 GiB with a file store,
	// 64 MiB with Redis (which keeps results in memory).
	MaxResultSize int64 `json:"max_result_size,omitempty"`
	// MaxEventSize bounds a job document, so every event. Default 64 KiB.
	MaxEventSize int `json:"max_event_size,omitempty"`
	// MaxDataSize bounds progress.data. Default 16 KiB.
	MaxDataSize int `json:"max_data_size,omitempty"`
	// EventsPerJob is how many events per job are kept for Last-Event-ID replay. Default 1000.
	EventsPerJob int `json:"events_per_job,omitempty"`
	// JournalSize, with a file store, is the size of each of the two journal files beside it,
	// which take the progress reports of running jobs with one write and one fdatasync each.
	// Default 16 MiB, at least 1 MiB; -1 turns the journal off (every report is then a
	// commit of the store file).
	JournalSize int64 `json:"journal_size,omitempty"`
	// CheckpointInterval, with a file store, is how often the journal's reports are copied
	// into the store file. Default 1s.
	CheckpointInterval caddy.Duration `json:"checkpoint_interval,omitempty"`
	// CallbackSecret is the secret upstream callback tokens derive from (at least 32
	// characters; placeholders such as {env.PROGRESS_SECRET} are expanded). Default: a random
	// secret made once and kept in the store, which is all one instance needs.
	CallbackSecret string `json:"callback_secret,omitempty"`
	// MaxCallbackSize bounds the body of one upstream progress report. Default 64 KiB.
	MaxCallbackSize int64 `json:"max_callback_size,omitempty"`
	// DisableMetrics keeps the caddy_progress_* metrics out of Caddy's metrics registry (and
	// saves their upkeep). Default: on, served at the admin endpoint's /metrics.
	DisableMetrics bool `json:"disable_metrics,omitempty"`
	// DisableTraces keeps the plugin's spans out of traces even where Caddy's tracing directive
	// traces the request (Caddy's own request spans stay). Default: on.
	DisableTraces bool `json:"disable_traces,omitempty"`

	path   string
	shared *shared
	done   context.Context
	stop   context.CancelFunc
	logger *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "progress", New: func() caddy.Module { return new(App) }}
}

// minSecretLen is the shortest callback_secret accepted: tokens are only as strong as it.
const minSecretLen = 32

// stores holds one open store and engine per file path or Redis URL, across config reloads:
// Caddy provisions the new config before it cleans up the old one, and bbolt locks its file.
var stores = caddy.NewUsagePool()

// shared is what one store file gives every config that uses it.
type shared struct {
	store  store.Store
	engine *engine.Engine
	// commitMetrics receives the store's commit timings; the newest config sets it (nil: off).
	commitMetrics atomic.Pointer[engine.Metrics]
}

// observeCommit is the store's ObserveCommit: the store is opened before any config has said
// whether it wants metrics, and outlives them all.
func (s *shared) observeCommit(took time.Duration, writes int) {
	s.commitMetrics.Load().ObserveCommit(took, writes)
}

// metrics are the process's caddy_progress_* metrics: one set, registered into the registry
// of every config Caddy loads, so the counts go on across reloads.
var metrics = engine.NewMetrics()

// Destruct runs when the last config using the store goes: running jobs end as interrupted.
func (s *shared) Destruct() error {
	s.engine.Close()
	return s.store.Close()
}

// Provision opens the store, or shares the one the previous config opened.
func (a *App) Provision(ctx caddy.Context) error {
	a.logger = ctx.Logger()
	if a.JobsPath == "" {
		a.JobsPath = engine.DefaultJobsPath
	}
	location := caddy.NewReplacer().ReplaceKnown(a.Store, "")
	redisURL := isRedisURL(location)
	switch {
	case redisURL:
		if a.JournalSize != 0 || a.CheckpointInterval != 0 {
			return errors.New("progress: journal and checkpoint_interval apply to a store file, not to Redis")
		}
		a.path = location
	default:
		if location == "" {
			location = filepath.Join(caddy.AppDataDir(), "progress", "progress.db")
		}
		abs, err := filepath.Abs(location)
		if err != nil {
			return fmt.Errorf("progress: store path %q: %w", location, err)
		}
		a.path = filepath.Clean(abs)
	}
	opts := store.Options{
		Retain: time.Duration(a.Retain), OpenTimeout: time.Duration(a.OpenTimeout),
		MaxResultSize: a.MaxResultSize, MaxEventSize: a.MaxEventSize, MaxDataSize: a.MaxDataSize,
		MaxEventsPerJob: a.EventsPerJob,
		JournalSize:     a.JournalSize, CheckpointInterval: time.Duration(a.CheckpointInterval),
	}
	var secret []byte
	if a.CallbackSecret != "" {
		secret = []byte(caddy.NewReplacer().ReplaceKnown(a.CallbackSecret, ""))
		if len(secret) < minSecretLen {
			return fmt.Errorf("progress: callback_secret is %d characters long; use at least %d random ones", len(secret), minSecretLen)
		}
	}
	logger := a.logger
	val, loaded, err := stores.LoadOrNew(a.path, func() (caddy.Destructor, error) {
		sh := new(shared)
		opts.ObserveCommit = sh.observeCommit
		var st store.Store
		var err error
		if redisURL {
			st, err = redisstore.Open(ctx, a.path, redisstore.Options{Options: opts, LeaseTime: time.Duration(a.LeaseTime)})
		} else {
			st, err = store.Open(a.path, opts)
		}
		if err != nil {
			return nil, err
		}
		sh.store, sh.engine = st, engine.New(st, logger, statusOf, secret)
		return sh, nil
	})
	if err != nil {
		return fmt.Errorf("progress: %w", err)
	}
	if loaded {
		a.logger.Debug("sharing the open job store", zap.String("store", redactedStore(a.path)))
	}
	a.shared = val.(*shared)
	a.shared.engine.SetTraces(!a.DisableTraces)
	if err := a.provisionMetrics(ctx); err != nil {
		return err
	}
	a.done, a.stop = context.WithCancel(context.Background())
	// Caddy stops its apps in no set order, and on exit the http app waits for every request
	// to end (grace_period is forever by default): end the event streams as soon as stopping
	// begins, not when this app's Stop comes, or an open stream keeps Caddy from exiting.
	if ev, err := ctx.App("events"); err == nil {
		if events, ok := ev.(*caddyevents.App); ok {
			events.On("stopping", onStopping(a.stop))
		}
	}
	return nil
}

// isRedisURL reports whether a store location names a Redis server rather than a file.
func isRedisURL(location string) bool {
	return strings.HasPrefix(location, "redis://") || strings.HasPrefix(location, "rediss://")
}

// redactedStore is a store location fit for a log: a Redis URL without its password.
func redactedStore(location string) string {
	if !isRedisURL(location) {
		return location
	}
	u, err := url.Parse(location)
	if err != nil {
		return "redis (unparsable URL)"
	}
	return u.Redacted()
}

// onStopping runs a function when Caddy starts stopping a config.
type onStopping func()

func (f onStopping) Handle(context.Context, caddy.Event) error {
	f()
	return nil
}

// Validate checks the options.
func (a *App) Validate() error {
	if !strings.HasPrefix(a.JobsPath, "/") || strings.HasSuffix(a.JobsPath, "/") || strings.ContainsAny(a.JobsPath, "*?#") {
		return fmt.Errorf("progress: jobs_path %q must start with / and not end with one, as in /_jobs", a.JobsPath)
	}
	if a.JournalSize < -1 || (a.JournalSize > 0 && a.JournalSize < store.MinJournalSize) {
		return fmt.Errorf("progress: journal must be at least %s, or off", humanize.IBytes(store.MinJournalSize))
	}
	for name, d := range map[string]caddy.Duration{"checkpoint_interval": a.CheckpointInterval, "lease_time": a.LeaseTime, "retain": a.Retain, "max_wait": a.MaxWait, "heartbeat": a.Heartbeat, "write_timeout": a.WriteTimeout, "open_timeout": a.OpenTimeout} {
		if d < 0 {
			return fmt.Errorf("progress: %s must not be negative", name)
		}
	}
	if a.MaxResultSize < 0 || a.MaxEventSize < 0 || a.MaxDataSize < 0 || a.EventsPerJob < 0 || a.MaxCallbackSize < 0 {
		return errors.New("progress: limits must not be negative")
	}
	return nil
}

// Start does nothing: the store opened at provisioning.
func (a *App) Start() error { return nil }

// Stop ends the event streams this config serves; their clients resume on the new config
// with Last-Event-ID. Jobs go on: the store and engine belong to every config using them.
func (a *App) Stop() error {
	a.stop()
	return nil
}

// Cleanup lets go of the shared store; the last config to do so closes it.
func (a *App) Cleanup() error {
	if a.stop != nil {
		a.stop()
	}
	if a.shared == nil {
		return nil
	}
	_, err := stores.Delete(a.path)
	return err
}

// api makes the job API of this config.
func (a *App) api() *engine.API {
	api := &engine.API{
		Engine: a.shared.engine, JobsPath: a.JobsPath, MaxWait: time.Duration(a.MaxWait),
		Heartbeat: time.Duration(a.Heartbeat), WriteTimeout: time.Duration(a.WriteTimeout),
		OwnerOf: ownerOf, Done: a.done,
		CallbackLimits: upstreamhook.Limits{MaxBody: a.MaxCallbackSize, MaxData: a.MaxDataSize},
	}
	api.Init()
	return api
}

// ownerOf evaluates an owner expression (Caddy placeholders) for a request.
func ownerOf(r *http.Request, expr string) string {
	if expr == "" {
		return ""
	}
	repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	if repl == nil {
		return ""
	}
	return repl.ReplaceAll(expr, "")
}

// statusOf reads the status of a Caddy handler error (reverse_proxy answers 502 when it cannot
// reach the upstream, 504 when it times out).
func statusOf(err error) int {
	var he caddyhttp.HandlerError
	if errors.As(err, &he) {
		return he.StatusCode
	}
	return 0
}

// appFrom finds the progress app of the config being provisioned, making it with defaults if
// the Caddyfile has no `progress` global option.
func appFrom(ctx caddy.Context) (*App, error) {
	v, err := ctx.App("progress")
	if err != nil {
		return nil, err
	}
	return v.(*App), nil
}

var (
	_ caddy.App          = (*App)(nil)
	_ caddy.Provisioner  = (*App)(nil)
	_ caddy.Validator    = (*App)(nil)
	_ caddy.CleanerUpper = (*App)(nil)
)
