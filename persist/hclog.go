package persist

import (
	"context"
	"io"
	"log"
	"log/slog"

	"github.com/hashicorp/go-hclog"
)

// slogHCLog bridges hclog.Logger, which raft's FileSnapshotStore requires,
// onto an injected slog.Logger. Levels map one to one (trace → debug);
// hclog's SetLevel is ignored: the slog handler decides.
type slogHCLog struct {
	l    *slog.Logger
	name string
	args []any
}

func newHCLog(l *slog.Logger, name string) hclog.Logger {
	return &slogHCLog{l: l, name: name}
}

func slogLevel(lv hclog.Level) slog.Level {
	switch lv {
	case hclog.Trace, hclog.Debug:
		return slog.LevelDebug
	case hclog.Warn:
		return slog.LevelWarn
	case hclog.Error:
		return slog.LevelError
	}
	return slog.LevelInfo
}

func (h *slogHCLog) Log(lv hclog.Level, msg string, args ...any) {
	if lv == hclog.Off || lv == hclog.NoLevel && msg == "" {
		return
	}
	h.l.Log(context.Background(), slogLevel(lv), msg, args...)
}
func (h *slogHCLog) Trace(msg string, args ...any) { h.Log(hclog.Trace, msg, args...) }
func (h *slogHCLog) Debug(msg string, args ...any) { h.Log(hclog.Debug, msg, args...) }
func (h *slogHCLog) Info(msg string, args ...any)  { h.Log(hclog.Info, msg, args...) }
func (h *slogHCLog) Warn(msg string, args ...any)  { h.Log(hclog.Warn, msg, args...) }
func (h *slogHCLog) Error(msg string, args ...any) { h.Log(hclog.Error, msg, args...) }

func (h *slogHCLog) enabled(lv slog.Level) bool { return h.l.Enabled(context.Background(), lv) }
func (h *slogHCLog) IsTrace() bool              { return h.enabled(slog.LevelDebug) }
func (h *slogHCLog) IsDebug() bool              { return h.enabled(slog.LevelDebug) }
func (h *slogHCLog) IsInfo() bool               { return h.enabled(slog.LevelInfo) }
func (h *slogHCLog) IsWarn() bool               { return h.enabled(slog.LevelWarn) }
func (h *slogHCLog) IsError() bool              { return h.enabled(slog.LevelError) }

func (h *slogHCLog) ImpliedArgs() []any { return h.args }
func (h *slogHCLog) With(args ...any) hclog.Logger {
	return &slogHCLog{l: h.l.With(args...), name: h.name, args: append(h.args[:len(h.args):len(h.args)], args...)}
}
func (h *slogHCLog) Name() string { return h.name }
func (h *slogHCLog) Named(name string) hclog.Logger {
	if h.name != "" {
		name = h.name + "." + name
	}
	return &slogHCLog{l: h.l, name: name, args: h.args}
}
func (h *slogHCLog) ResetNamed(name string) hclog.Logger {
	return &slogHCLog{l: h.l, name: name, args: h.args}
}
func (h *slogHCLog) SetLevel(hclog.Level) {}
func (h *slogHCLog) GetLevel() hclog.Level {
	switch {
	case h.IsDebug():
		return hclog.Debug
	case h.IsInfo():
		return hclog.Info
	case h.IsWarn():
		return hclog.Warn
	}
	return hclog.Error
}
func (h *slogHCLog) StandardLogger(opts *hclog.StandardLoggerOptions) *log.Logger {
	return slog.NewLogLogger(h.l.Handler(), slog.LevelInfo)
}
func (h *slogHCLog) StandardWriter(opts *hclog.StandardLoggerOptions) io.Writer {
	return h.StandardLogger(opts).Writer()
}
