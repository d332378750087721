-- grid_sample.lua: nn.GridSample{padding_mode = 'zeros' | 'border', align_corners = false}: bilinear
-- sampling as torch.nn.functional.grid_sample. Input {input (N, C, H, W), grid (N, Ho, Wo, 2)} with
-- grid (x, y) in [-1, 1]; output (N, C, Ho, Wo); gradInput {gradInput, gradGrid}.
local fa = require 'fastattn'
local nn = require 'fastattn.nn'
local F = require 'fastattn.functional'

local E = require 'fastattn.errors'
local op = F._impl

local GridSample = nn.class('GridSample', nn.Module)

function GridSample:__init(opts)
  nn.Module.__init(self)
  local o = E.opts('fa.nn.GridSample', 'opts', opts, { mode = true, padding_mode = true, align_corners = true })
  self._pad, self._ac = F._grid_sample_opts('fa.nn.GridSample', o)
  self.padding_mode = o.padding_mode or 'zeros'
  self.align_corners = o.align_corners == true
  self.gradInput = {}
end

function GridSample:__tostring__()
  return string.format('nn.GridSample(%s%s)', self.padding_mode, self.align_corners and ', align_corners' or '')
end

function GridSample:_unpack(fn, input)
  if type(input) ~= 'table' or fa.isTensor(input) then E.argv(fn, 'input', 'a table {input, grid}', input) end
  return input[1], input[2]
end

function GridSample:updateOutput(input)
  local fn = self.__fnForward
  local x, grid = self:_unpack(fn, input)
  E.tensor(fn, 'input', x)
  E.tensor(fn, 'grid', grid)
  self.output = nn._buffer(self.output, { x:dim() == 4 and x:size(1) or 0, x:dim() == 4 and x:size(2) or 0,
    grid:dim() == 4 and grid:size(2) or 0, grid:dim() == 4 and grid:size(3) or 0 }, x)
  return op.grid_sample(fn, x, grid, { out = self.output }, self._pad, self._ac)
end

function GridSample:updateGradInput(input, gradOutput)
  local fn = self.__fnUpdateGradInput
  local x, grid = self:_unpack(fn, input)
  E.tensor(fn, 'input', x)
  E.tensor(fn, 'grid', grid)
  if x:dim() == 4 and grid:dim() == 4 then
    nn._checkGradOutput(fn, gradOutput, x, { x:size(1), x:size(2), grid:size(2), grid:size(3) })
  end
  local gi = self.gradInput
  if type(gi) ~= 'table' or fa.isTensor(gi) then gi = {}; self.gradInput = gi end
  gi[1] = nn._buffer(gi[1], x:size(), x)
  gi[2] = nn._buffer(gi[2], grid:size(), grid)
  op.grid_sample_backward(fn, gradOutput, x, grid, { grad_input = gi[1], grad_grid = gi[2] }, self._pad, self._ac)
  return gi
end

return GridSample
