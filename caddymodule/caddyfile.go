package caddymodule

import (
	"strconv"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"
)

func init() {
	httpcaddyfile.RegisterGlobalOption("progress", parseGlobal)
	httpcaddyfile.RegisterDirective("progress", parseHandlerRoute)
	httpcaddyfile.RegisterHandlerDirective("progress_api", parseAPI)
	// Both come before reverse_proxy, so a Caddyfile needs no `order` line; progress_api first,
	// so that job URLs are served before a `progress` matcher could claim them.
	httpcaddyfile.RegisterDirectiveOrder("progress_api", httpcaddyfile.Before, "reverse_proxy")
	httpcaddyfile.RegisterDirectiveOrder("progress", httpcaddyfile.Before, "reverse_proxy")
}

// parseGlobal sets up the progress app from the global option:
//
//	progress {
//		store           <path> | redis://[user:password@]host:port/db | rediss://…
//		lease_time      <duration>
//		retain          <duration>
//		jobs_path       <path>
//		max_wait        <duration>
//		heartbeat       <duration>
//		write_timeout   <duration>
//		open_timeout    <duration>
//		max_result_size <size>
//		max_event_size  <size>
//		max_data_size   <size>
//		events_per_job  <count>
//		journal         <size>|off
//		checkpoint_interval <duration>
//		callback_secret <secret>
//		max_callback_size <size>
//		metrics         on|off
//	}
func parseGlobal(d *caddyfile.Dispenser, _ any) (any, error) {
	app := new(App)
	if err := app.UnmarshalCaddyfile(d); err != nil {
		return nil, err
	}
	return httpcaddyfile.App{Name: "progress", Value: caddyconfig.JSON(app, nil)}, nil
}

// UnmarshalCaddyfile reads the `progress` global option; see parseGlobal for the syntax.
func (a *App) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the option name
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		var err error
		switch d.Val() {
		case "store":
			err = oneString(d, &a.Store)
		case "jobs_path":
			err = oneString(d, &a.JobsPath)
		case "lease_time":
			err = oneDuration(d, &a.LeaseTime)
		case "retain":
			err = oneDuration(d, &a.Retain)
		case "max_wait":
			err = oneDuration(d, &a.MaxWait)
		case "heartbeat":
			err = oneDuration(d, &a.Heartbeat)
		case "write_timeout":
			err = oneDuration(d, &a.WriteTimeout)
		case "open_timeout":
			err = oneDuration(d, &a.OpenTimeout)
		case "max_result_size":
			err = oneSize(d, &a.MaxResultSize)
		case "max_event_size":
			err = oneIntSize(d, &a.MaxEventSize)
		case "max_data_size":
			err = oneIntSize(d, &a.MaxDataSize)
		case "events_per_job":
			err = oneInt(d, &a.EventsPerJob)
		case "journal":
			err = journalSize(d, &a.JournalSize)
		case "checkpoint_interval":
			err = oneDuration(d, &a.CheckpointInterval)
		case "callback_secret":
			err = oneString(d, &a.CallbackSecret)
		case "max_callback_size":
			err = oneSize(d, &a.MaxCallbackSize)
		case "metrics":
			err = onOff(d, "metrics", &a.DisableMetrics)
		case "traces":
			err = onOff(d, "traces", &a.DisableTraces)
		default:
			return d.Errf("unrecognized subdirective %q", d.Val())
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// parseHandlerRoute does what httpcaddyfile.RegisterHandlerDirective does, and also names the
// handler after its matcher token (/reports/*, @slow), which groups its jobs for estimates.
func parseHandlerRoute(h httpcaddyfile.Helper) ([]httpcaddyfile.ConfigValue, error) {
	if !h.Next() {
		return nil, h.ArgErr()
	}
	matcherSet, hasMatcher, err := h.MatcherToken()
	if err != nil {
		return nil, err
	}
	matcherText := ""
	if hasMatcher {
		matcherText = h.Val()
		h.Dispenser.Delete()
	}
	h.Dispenser.Reset()
	handler := new(Handler)
	if err := handler.UnmarshalCaddyfile(h.Dispenser); err != nil {
		return nil, err
	}
	if handler.Name == "" {
		handler.Name = matcherText
	}
	return h.NewRoute(matcherSet, handler), nil
}

// UnmarshalCaddyfile reads the `progress` directive:
//
//	progress [<matcher>] {
//		async            prefer | always | after <duration>
//		concurrency      <count>
//		max_queue        <count>
//		timeout          <duration>
//		callback_base    <origin>
//		owner            <placeholder expression>
//		max_request_body <size>
//		spool_above      <size>
//		estimate         <interval> | off
//		name             <name>
//	}
//
// name defaults to the matcher token (such as /reports/* or @slow).
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		var err error
		switch d.Val() {
		case "async":
			if !d.NextArg() {
				return d.ArgErr()
			}
			h.Async = d.Val()
			switch h.Async {
			case "prefer", "always":
			case "after":
				err = oneDuration(d, &h.After)
			default:
				return d.Errf("async %q: want prefer, always or after <duration>", h.Async)
			}
			if err == nil && d.NextArg() {
				return d.ArgErr()
			}
		case "concurrency":
			err = oneInt(d, &h.Concurrency)
		case "max_queue":
			err = oneInt(d, &h.MaxQueue)
		case "timeout":
			err = oneDuration(d, &h.Timeout)
		case "callback_base":
			err = oneString(d, &h.CallbackBase)
		case "owner":
			err = oneString(d, &h.Owner)
		case "max_request_body":
			err = oneSize(d, &h.MaxRequestBody)
		case "spool_above":
			err = oneSize(d, &h.SpoolAbove)
		case "estimate":
			args := d.RemainingArgs()
			if len(args) != 1 {
				return d.ArgErr()
			}
			if args[0] == "off" {
				h.EstimateInterval = -1
				break
			}
			every, perr := caddy.ParseDuration(args[0])
			if perr != nil || every <= 0 {
				return d.Errf("estimate %q: want a positive interval such as 1s, or off", args[0])
			}
			h.EstimateInterval = caddy.Duration(every)
		case "name":
			err = oneString(d, &h.Name)
		default:
			return d.Errf("unrecognized subdirective %q", d.Val())
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func parseAPI(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	handler := new(APIHandler)
	err := handler.UnmarshalCaddyfile(h.Dispenser)
	return handler, err
}

// UnmarshalCaddyfile reads the `progress_api` directive, which takes no options (the job API's
// path and limits are the `progress` global option's):
//
//	progress_api [<matcher>]
func (h *APIHandler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		return d.Errf("unrecognized subdirective %q", d.Val())
	}
	return nil
}

func oneString(d *caddyfile.Dispenser, dst *string) error {
	if !d.NextArg() {
		return d.ArgErr()
	}
	*dst = d.Val()
	if d.NextArg() {
		return d.ArgErr()
	}
	return nil
}

func oneDuration(d *caddyfile.Dispenser, dst *caddy.Duration) error {
	var s string
	if err := oneString(d, &s); err != nil {
		return err
	}
	v, err := caddy.ParseDuration(s)
	if err != nil {
		return d.Errf("%s: %v", s, err)
	}
	*dst = caddy.Duration(v)
	return nil
}

func oneInt(d *caddyfile.Dispenser, dst *int) error {
	var s string
	if err := oneString(d, &s); err != nil {
		return err
	}
	v, err := strconv.Atoi(s)
	if err != nil || v < 0 {
		return d.Errf("%q is not a whole number", s)
	}
	*dst = v
	return nil
}

func oneSize(d *caddyfile.Dispenser, dst *int64) error {
	var s string
	if err := oneString(d, &s); err != nil {
		return err
	}
	v, err := humanize.ParseBytes(s)
	if err != nil || v > 1<<62 {
		return d.Errf("%q is not a size such as 64KiB or 1GB", s)
	}
	*dst = int64(v)
	return nil
}

// journalSize reads `journal <size>|off`; off is -1.
func journalSize(d *caddyfile.Dispenser, dst *int64) error {
	if d.CountRemainingArgs() == 1 && d.NextArg() {
		if d.Val() == "off" {
			*dst = -1
			return nil
		}
		d.Prev()
	}
	return oneSize(d, dst)
}

func oneIntSize(d *caddyfile.Dispenser, dst *int) error {
	var v int64
	if err := oneSize(d, &v); err != nil {
		return err
	}
	if v > 1<<31 {
		return d.Errf("%d bytes is too large", v)
	}
	*dst = int(v)
	return nil
}

var (
	_ caddyfile.Unmarshaler = (*App)(nil)
	_ caddyfile.Unmarshaler = (*Handler)(nil)
	_ caddyfile.Unmarshaler = (*APIHandler)(nil)
)

// onOff reads the one argument of a switch, on or off, into a Disable… field.
func onOff(d *caddyfile.Dispenser, name string, disabled *bool) error {
	var v string
	if err := oneString(d, &v); err != nil {
		return err
	}
	switch v {
	case "on":
		*disabled = false
	case "off":
		*disabled = true
	default:
		return d.Errf("%s must be on or off, not %q", name, v)
	}
	return nil
}
