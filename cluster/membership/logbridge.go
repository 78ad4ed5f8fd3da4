package membership

import (
	"bytes"
	"context"
	"log/slog"
)

// logWriter bridges memberlist's *log.Logger into slog. memberlist writes
// one line per call, "[LEVEL] memberlist: message"; the writer turns it into
// a record at the matching level with component=memberlist. Lines without a
// level tag are logged at Info.
type logWriter struct {
	log *slog.Logger
}

func newLogWriter(l *slog.Logger) *logWriter {
	return &logWriter{log: l.With("component", "memberlist")}
}

// levelTrace is below Debug, as in the cluster package's hclog bridge.
const levelTrace = slog.LevelDebug - 4

var levelTags = map[string]slog.Level{
	"TRACE":   levelTrace,
	"DEBUG":   slog.LevelDebug,
	"INFO":    slog.LevelInfo,
	"WARN":    slog.LevelWarn,
	"WARNING": slog.LevelWarn,
	"ERR":     slog.LevelError,
	"ERROR":   slog.LevelError,
}

// parseLogLine splits "[LEVEL] memberlist: msg" into its level and message.
func parseLogLine(p []byte) (slog.Level, []byte) {
	line := bytes.TrimRight(p, "\r\n")
	level := slog.LevelInfo
	if len(line) > 0 && line[0] == '[' {
		if end := bytes.IndexByte(line, ']'); end > 0 {
			if l, ok := levelTags[string(line[1:end])]; ok {
				level = l
				line = bytes.TrimLeft(line[end+1:], " ")
			}
		}
	}
	return level, bytes.TrimPrefix(line, []byte("memberlist: "))
}

func (w *logWriter) Write(p []byte) (int, error) {
	level, msg := parseLogLine(p)
	if w.log.Enabled(context.Background(), level) {
		w.log.Log(context.Background(), level, string(msg))
	}
	return len(p), nil
}
