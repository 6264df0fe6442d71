package vsock

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseMode(t *testing.T) {
	tests := []struct {
		in      string
		want    Mode
		wantErr bool
	}{
		{in: "", want: ModeAuto},
		{in: "auto", want: ModeAuto},
		{in: "kernel", want: ModeKernel},
		{in: "user", want: ModeUser},
		{in: " User\n", want: ModeUser},
		{in: "KERNEL", want: ModeKernel},
		{in: "vhost", wantErr: true},
		{in: "userspace", wantErr: true},
		{in: "1", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParseMode(tt.in)
			if tt.wantErr {
				require.Error(t, err)
				assert.Contains(t, err.Error(), EnvMode)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
		})
	}
}
