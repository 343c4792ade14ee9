"""PyTorch reference of DINO's head, loss and EMA updates (facebookresearch/dino @ 7c446df:
`vision_transformer.py` `DINOHead` with norm_last_layer=True and no batch norm; `main_dino.py` `DINOLoss`
and the teacher update of `train_one_epoch`), for `tests/test_dino_parity.py`. The loss takes the teacher
temperature as an argument instead of an epoch index into its schedule, and runs on one process."""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class TorchDINOHead(nn.Module):
    def __init__(self, in_dim, out_dim, nlayers=3, hidden_dim=64, bottleneck_dim=32):
        super().__init__()
        layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
        for _ in range(nlayers - 2):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        self.last_layer.weight_g.requires_grad = False

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class TorchDINOLoss(nn.Module):
    def __init__(self, out_dim, ncrops, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp, self.center_momentum, self.ncrops = student_temp, center_momentum, ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output, teacher_output, temp):
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
        total_loss, n_loss_terms = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                total_loss += torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


@torch.no_grad()
def ema_update(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    for param_q, param_k in zip(student.parameters(), teacher.parameters()):
        param_k.data.mul_(momentum).add_((1 - momentum) * param_q.detach().data)


def jax_head_params(head: TorchDINOHead) -> dict:
    """`jaxseg.models.dino.DINOHead` params of a `TorchDINOHead` (its direction `weight_v`, whose norm the
    fixed gain of 1 divides away)."""
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    params = {f"mlp_{i}": {"kernel": m.weight.detach().numpy().T, "bias": m.bias.detach().numpy()}
              for i, m in enumerate(linears)}
    params["last_layer"] = np.asarray(head.last_layer.weight_v.detach().numpy().T)
    return params
