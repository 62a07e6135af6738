package caddymodule

import (
	"errors"
	"fmt"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/caddy-progress/progress/store"
)

// provisionMetrics registers the metrics with the registry of the config being loaded (served
// at the admin endpoint's /metrics) and turns them on or off for the shared engine and store.
func (a *App) provisionMetrics(ctx caddy.Context) error {
	if a.DisableMetrics {
		a.shared.engine.SetMetrics(nil)
		a.shared.commitMetrics.Store(nil)
		return nil
	}
	reg := ctx.GetMetricsRegistry()
	if reg != nil {
		for _, c := range append(metrics.Collectors(), storeSize{}) {
			// Each config has a registry of its own; one that already has ours is fine.
			if err := reg.Register(c); err != nil && !errors.As(err, new(prometheus.AlreadyRegisteredError)) {
				return fmt.Errorf("progress: registering metrics: %w", err)
			}
		}
	}
	a.shared.engine.SetMetrics(metrics)
	a.shared.commitMetrics.Store(metrics)
	return nil
}

// storeSize reports the disk space of every open store at scrape time.
type storeSize struct{}

var storeSizeDesc = prometheus.NewDesc("caddy_progress_store_size_bytes",
	"Disk space the job store takes: the database file and the result bodies kept beside it.", []string{"store"}, nil)

func (storeSize) Describe(ch chan<- *prometheus.Desc) { ch <- storeSizeDesc }

func (storeSize) Collect(ch chan<- prometheus.Metric) {
	// The pool is locked while Range runs: take the stores out, measure them after.
	type open struct {
		path  string
		store store.Store
	}
	var all []open
	stores.Range(func(key, value any) bool {
		if sh, ok := value.(*shared); ok && sh.store != nil {
			all = append(all, open{redactedStore(fmt.Sprint(key)), sh.store})
		}
		return true
	})
	for _, o := range all {
		if insp, ok := o.store.(store.Inspector); ok {
			if size, err := insp.SizeBytes(); err == nil {
				ch <- prometheus.MustNewConstMetric(storeSizeDesc, prometheus.GaugeValue, float64(size), o.path)
			}
		}
	}
}
