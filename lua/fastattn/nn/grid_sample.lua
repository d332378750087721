-- grid_sample.lua: nn.GridSample{padding_mode = 'zeros' | 'border', align_corners = false}: bilinear
-- sampling as torch.nn.functional.grid_sample. Input {input (N, C, H, W), grid (N, Ho, Wo, 2)} with
-- grid (x, y) in [-1, 1]; output (N, C, Ho, Wo); gradInput {gradInput, gradGrid}.
local fa = require 'fastattn'
local nn = require 'fastattn.nn'
local F = require 'fastattn.functional'

local GridSample = nn.class('GridSample', nn.Module)

function GridSample:__init(opts)
  nn.Module.__init(self)
  opts = opts or {}
  if type(opts) ~= 'table' then error('nn.GridSample: expected a table {padding_mode=, align_corners=}, got ' .. type(opts), 3) end
  self.padding_mode = opts.padding_mode or 'zeros'
  self.align_corners = opts.align_corners and true or false
  self._pad, self._ac = F._grid_sample_opts('nn.GridSample', opts)
  self.gradInput = {}
end

function GridSample:__tostring__()
  return string.format('nn.GridSample(%s%s)', self.padding_mode, self.align_corners and ', align_corners' or '')
end

function GridSample:_unpack(input)
  if type(input) ~= 'table' or fa.isTensor(input) then
    error(tostring(self) .. ': expected a table {input, grid}, got ' .. type(input), 0)
  end
  local x, grid = input[1], input[2]
  local ok, shape = pcall(F.grid_sample_check, tostring(self), x, grid)
  if not ok then error(nn._strip_position(shape), 0) end
  return x, grid, shape
end

function GridSample:updateOutput(input)
  local x, grid, shape = self:_unpack(input)
  self.output = nn._buffer(self.output, shape, x)
  return F.grid_sample_forward(self.output, x, grid, self._pad, self._ac)
end

function GridSample:updateGradInput(input, gradOutput)
  local x, grid = self:_unpack(input)
  local gi = self.gradInput
  if type(gi) ~= 'table' or fa.isTensor(gi) then gi = {}; self.gradInput = gi end
  gi[1] = nn._buffer(gi[1], x:size(), x)
  gi[2] = nn._buffer(gi[2], grid:size(), grid)
  F.grid_sample_backward(gi[1], gi[2], gradOutput, x, grid, self._pad, self._ac)
  return gi
end

return GridSample
