//! CPF and CNPJ rules (numeric and alphanumeric CNPJ).

use pix::document::{cnpj, cpf, DocumentError};

#[test]
fn cpf_rules() {
    assert_eq!(cpf("529.982.247-25"), Ok("52998224725".into()));
    assert_eq!(cpf("52998224725"), Ok("52998224725".into()));
    assert_eq!(cpf("529.982.247-24"), Err(DocumentError::CheckDigits));
    assert_eq!(cpf("111.111.111-11"), Err(DocumentError::Repeated));
    assert_eq!(cpf("5299822472"), Err(DocumentError::Length { expected: 11, found: 10 }));
    assert_eq!(cpf("5299822472X"), Err(DocumentError::Character { position: 10 }));
}

#[test]
fn cnpj_rules_numeric_and_alphanumeric() {
    assert_eq!(cnpj("11.222.333/0001-81"), Ok("11222333000181".into()));
    assert_eq!(cnpj("11.222.333/0001-80"), Err(DocumentError::CheckDigits));
    // Receita Federal's example of the alphanumeric CNPJ (IN RFB 2.229/2024).
    assert_eq!(cnpj("12.ABC.345/01DE-35"), Ok("12ABC34501DE35".into()));
    assert_eq!(cnpj("12.abc.345/01de-35"), Ok("12ABC34501DE35".into()), "letters are upper-cased");
    assert_eq!(cnpj("12.ABC.345/01DE-36"), Err(DocumentError::CheckDigits));
    assert_eq!(cnpj("12.ABC.345/01DE-3A"), Err(DocumentError::Character { position: 13 }));
    assert_eq!(cnpj("12.AB#.345/01DE-35"), Err(DocumentError::Character { position: 4 }));
    assert_eq!(cnpj("00.000.000/0000-00"), Err(DocumentError::Repeated));
}

#[test]
fn any_tells_persons_from_companies() {
    assert_eq!(pix::document::any("529.982.247-25"), Ok(("52998224725".into(), true)));
    assert_eq!(pix::document::any("11.222.333/0001-81"), Ok(("11222333000181".into(), false)));
    assert_eq!(pix::document::any("12.ABC.345/01DE-35"), Ok(("12ABC34501DE35".into(), false)));
    assert_eq!(pix::document::any("529.982.247-24"), Err(pix::document::DocumentError::CheckDigits));
    assert!(matches!(pix::document::any("123"), Err(pix::document::DocumentError::Length { expected: 14, .. })));
}
