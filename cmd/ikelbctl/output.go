package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
	"gopkg.in/yaml.v3"

	"github.com/ikelb/ikelb/cmd/internal/spec"
	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
)

// jsonOptions fix the JSON field names to the proto names (snake_case) and
// print every field, so scripts see the same shape every time.
var jsonOptions = protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: true}

// marshalJSON renders m as indented JSON. protojson's own whitespace is
// deliberately unstable, so it is re-indented with encoding/json.
func marshalJSON(m proto.Message) ([]byte, error) {
	raw, err := jsonOptions.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("encode json: %w", err)
	}
	var buf bytes.Buffer
	if err := json.Indent(&buf, raw, "", "  "); err != nil {
		return nil, fmt.Errorf("encode json: %w", err)
	}
	buf.WriteByte('\n')
	return buf.Bytes(), nil
}

// printMessage prints m as JSON or YAML (for -o json|yaml).
func (a *app) printMessage(m proto.Message) error {
	b, err := marshalJSON(m)
	if err != nil {
		return err
	}
	if a.output == "yaml" {
		var v any
		if err := json.Unmarshal(b, &v); err != nil {
			return fmt.Errorf("encode yaml: %w", err)
		}
		if b, err = marshalYAML(v); err != nil {
			return err
		}
	}
	_, err = a.stdout.Write(b)
	return err
}

func marshalYAML(v any) ([]byte, error) {
	b, err := yaml.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("encode yaml: %w", err)
	}
	return b, nil
}

// printServices prints services for -o json (the given message) or -o yaml
// (the declarative format, ready for apply -f).
func (a *app) printServices(m proto.Message, svcs ...*ikelbv1.Service) error {
	if a.output == "yaml" {
		b, err := spec.ToYAML(svcs)
		if err != nil {
			return err
		}
		_, err = a.stdout.Write(b)
		return err
	}
	return a.printMessage(m)
}

// table writes aligned columns; Flush prints them.
type table struct{ tw *tabwriter.Writer }

func newTable(w io.Writer, header ...string) *table {
	t := &table{tw: tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)}
	if len(header) > 0 {
		t.row(toAny(header)...)
	}
	return t
}

func toAny(s []string) []any {
	out := make([]any, len(s))
	for i, v := range s {
		out[i] = v
	}
	return out
}

func (t *table) row(cells ...any) {
	for i, c := range cells {
		if i > 0 {
			t.tw.Write([]byte{'\t'})
		}
		s := fmt.Sprint(c)
		if s == "" {
			s = "-"
		}
		t.tw.Write([]byte(s))
	}
	t.tw.Write([]byte{'\n'})
}

func (t *table) flush() error { return t.tw.Flush() }

// keyValues prints "Key:  value" lines aligned.
func keyValues(w io.Writer, kv ...string) error {
	tw := tabwriter.NewWriter(w, 0, 4, 1, ' ', 0)
	for i := 0; i+1 < len(kv); i += 2 {
		v := kv[i+1]
		if v == "" {
			v = "-"
		}
		fmt.Fprintf(tw, "%s:\t%s\n", kv[i], v)
	}
	return tw.Flush()
}

// age renders how long ago t was, compactly: 45s, 12m, 3h12m, 2d3h.
func (a *app) age(t *timestamppb.Timestamp) string {
	if t == nil || (t.GetSeconds() == 0 && t.GetNanos() == 0) {
		return "-"
	}
	d := a.now().Sub(t.AsTime())
	if d < 0 {
		d = 0
	}
	return compactDuration(d)
}

func compactDuration(d time.Duration) string {
	d = d.Round(time.Second)
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	case d < 24*time.Hour:
		h := int(d.Hours())
		return fmt.Sprintf("%dh%dm", h, int(d.Minutes())-60*h)
	}
	days := int(d.Hours()) / 24
	return fmt.Sprintf("%dd%dh", days, int(d.Hours())-24*days)
}

func healthName(h ikelbv1.BackendHealth) string {
	switch h {
	case ikelbv1.BackendHealth_BACKEND_HEALTH_UP:
		return "up"
	case ikelbv1.BackendHealth_BACKEND_HEALTH_DOWN:
		return "down"
	}
	return "unknown"
}

func ports(p []uint32) string {
	s := make([]string, len(p))
	for i, v := range p {
		s[i] = strconv.FormatUint(uint64(v), 10)
	}
	return strings.Join(s, ",")
}

func duration(d interface{ AsDuration() time.Duration }) string {
	if d == nil {
		return ""
	}
	return spec.FormatDuration(d.AsDuration())
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}
